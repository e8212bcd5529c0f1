"""The one pass over data that every curvature statistic shares.

For each batch the model runs forward once (in eval mode, so BatchNorm uses its running
statistics and examples are independent); forward hooks keep each target layer's input
and output.  The loss is the *sum* over examples of the per-example negative
log-likelihood, so ``d loss / d output`` at example ``n`` is exactly the gradient of that
example's own loss.  Gradients are taken with :func:`torch.autograd.grad` with respect
to the layer outputs only: parameters' ``.grad`` are never touched and no weight-gradient
GEMMs are spent.

For the *true* Fisher the labels are sampled from the model's own predictive distribution
(``samples`` draws per input, one backward each); for the *empirical* Fisher the dataset
labels are used.  The label generator is reseeded per batch from ``(seed, batch index)``,
so a batch's draws do not depend on which other batches were processed -- which is what
lets ranks of a distributed job each take a share of the batches and still reproduce the
single-process statistics exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, CurvatureError, ModelError
from ..layers import adapter_for, is_plain_layer
from ..modelcall import (
    IGNORE_INDEX,
    call_model,
    check_labels,
    eval_mode,
    resolve_device,
    split_batch,
    to_device,
)
from .types import FISHER_TYPES, FisherType


@dataclass
class LayerCall:
    """One call of a target layer in one batch: its input and the gradient at its output.

    ``draw`` numbers the label draws of the batch (true Fisher, ``samples > 1``): the input
    is the same tensor for every draw, so input-side statistics need only draw 0.
    ``batch`` is the batch's index in the loader.
    """

    inputs: torch.Tensor
    grad_output: torch.Tensor
    draw: int = 0
    batch: int = 0


def batch_seed(seed: int, step: int) -> int:
    """Seed of the label draws of batch ``step`` (a fixed mix of the two, non-negative)."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) & 0x7FFF_FFFF_FFFF_FFFF


def resolve_targets(
    model: nn.Module, modules: Iterable[str] | Iterable[nn.Module] | None
) -> dict[str, nn.Module]:
    """Map names to the Linear/Conv2d layers to collect on (all of them by default)."""
    named = dict(model.named_modules())
    if modules is None:
        targets = {n: m for n, m in named.items() if is_plain_layer(m)}
    else:
        by_id = {id(m): n for n, m in named.items()}
        targets = {}
        for item in modules:
            name = item if isinstance(item, str) else by_id.get(id(item))
            if name is None or name not in named:
                raise ModelError(f"layer {item!r} is not a submodule of the model")
            adapter = adapter_for(named[name])
            if adapter is None or not adapter.curvature:
                raise ModelError(
                    f"layer {name!r} is a {type(named[name]).__name__}; curvature is "
                    "estimated for nn.Linear and nn.Conv2d layers only"
                )
            if not is_plain_layer(named[name]):
                raise ModelError(
                    f"layer {name!r} is a {type(named[name]).__name__} with its own forward "
                    "(e.g. padding inside it): its K-FAC factors would be wrong; leave it out"
                )
            targets[name] = named[name]
    if not targets:
        raise ModelError(
            "the model has no nn.Linear or nn.Conv2d layer: there is nothing to estimate "
            "curvature for or to prune"
        )
    return targets


def _sampled_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over examples (and tokens) of the negative log-likelihood of ``labels``."""
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # low-precision logits: take the loss in fp32
    return F.cross_entropy(flat, labels.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX)


@dataclass(frozen=True)
class DataPass:
    """Which batches and labels a pass over data uses: the arguments shared by every
    curvature pass (K-FAC factors, the EKFAC diagonal), kept together so they agree."""

    fisher: FisherType = "true"
    batches: int | None = None
    samples: int = 1
    seed: int = 0
    device: torch.device | str | None = None

    def layer_calls(
        self,
        model: nn.Module,
        loader: Iterable,
        targets: dict[str, nn.Module],
        shard: tuple[int, int] | None = None,
    ) -> Iterator[tuple[int, dict[str, list[LayerCall]]]]:
        """:func:`iterate_layer_calls` with this pass's settings."""
        rank, world = self._checked_shard(shard)
        batches = self.batches
        device = resolve_device(self.device, model)
        generator = torch.Generator(device=device)

        records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in targets}
        zero = torch.zeros((), device=device, requires_grad=True)

        def make_hook(name: str) -> Callable:
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                if not output.requires_grad:
                    # Frozen layers (requires_grad=False everywhere upstream): route the output
                    # through a graph node so d loss / d output still exists. Flags untouched.
                    output = output + zero
                records[name].append((args[0].detach(), output))
                return output

            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in targets.items()]
        try:
            with eval_mode(model), torch.enable_grad():
                for step, batch in enumerate(loader):
                    if batches is not None and step >= batches:
                        break
                    if step % world != rank:
                        continue
                    inputs, labels = split_batch(batch, step)
                    inputs = to_device(inputs, device)
                    for calls in records.values():
                        calls.clear()
                    logits = call_model(model, inputs)
                    if not torch.isfinite(logits).all():
                        raise CurvatureError(
                            f"non-finite loss: the model output holds NaN/Inf in batch {step}; "
                            "check the inputs for NaN/Inf and that the model is trained"
                        )
                    outputs = [out for n in targets for _, out in records[n]]
                    if not outputs:
                        raise ModelError("no target layer was called in the forward pass")
                    draws = self._label_draws(logits, labels, step, generator, device)
                    for k, drawn in enumerate(draws):
                        loss = _sampled_nll(logits, drawn)
                        if not torch.isfinite(loss):
                            raise CurvatureError(
                                f"non-finite loss ({loss.item()}) in batch {step}: check the "
                                "inputs for NaN/Inf and that the model is trained"
                            )
                        grads = torch.autograd.grad(
                            loss, outputs, retain_graph=k < len(draws) - 1, allow_unused=True
                        )
                        per_layer = _layer_calls(records, grads, k, step)
                        yield logits.shape[0], per_layer
        finally:
            for h in handles:
                h.remove()
            for calls in records.values():
                calls.clear()

    def _checked_shard(self, shard: tuple[int, int] | None) -> tuple[int, int]:
        """``(rank, world_size)`` of the shard, once every setting is checked."""
        if self.fisher not in FISHER_TYPES:
            raise ConfigError(f"fisher must be one of {FISHER_TYPES}, got {self.fisher!r}")
        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {self.samples}")
        if self.fisher == "empirical" and self.samples != 1:
            raise ConfigError("the empirical Fisher uses the dataset labels: samples must be 1")
        if self.batches is not None and self.batches < 1:
            raise ConfigError(f"batches must be >= 1 or None, got {self.batches}")
        rank, world = shard if shard is not None else (0, 1)
        if not 0 <= rank < world:
            raise ConfigError(
                f"shard must be (rank, world_size) with 0 <= rank < world, got {shard}"
            )
        return rank, world

    def _label_draws(
        self,
        logits: torch.Tensor,
        labels: object,
        step: int,
        generator: torch.Generator,
        device: torch.device,
    ) -> list:
        """The labels of batch ``step``: the dataset's (empirical Fisher) or ``samples``
        draws from the model's predictive distribution, seeded per batch (true Fisher)."""
        if self.fisher == "empirical":
            check_labels(labels, logits.shape[-1], f"batch {step} of the loader")
            return [to_device(labels, device)]
        generator.manual_seed(batch_seed(self.seed, step))
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float(), dim=-1)
            flat = probs.reshape(-1, probs.shape[-1])
            return [
                torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
                for _ in range(self.samples)
            ]


def _layer_calls(
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    grads: tuple[torch.Tensor | None, ...],
    draw: int,
    step: int,
) -> dict[str, list[LayerCall]]:
    """Pair every recorded layer input with the gradient at that call's output (zeros where
    the loss does not depend on it)."""
    it = iter(grads)
    per_layer: dict[str, list[LayerCall]] = {}
    for name, calls in records.items():
        per_layer[name] = []
        for inp, out in calls:
            g = next(it)
            if g is None:
                g = torch.zeros_like(out)
            per_layer[name].append(LayerCall(inp, g.detach(), draw, step))
    return per_layer


def iterate_layer_calls(
    model: nn.Module,
    loader: Iterable,
    targets: dict[str, nn.Module],
    *,
    fisher: FisherType = "true",
    batches: int | None = None,
    samples: int = 1,
    seed: int = 0,
    device: torch.device | str | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[int, dict[str, list[LayerCall]]]]:
    """Yield ``(num_examples, {layer name: [LayerCall, ...]})`` per batch and label draw.

    A layer called several times in one forward (weight sharing) yields one LayerCall per
    call; callers treat each call as extra locations of the same layer.

    ``shard=(rank, world_size)`` processes only the batches whose index ``i`` (among the
    first ``batches``) has ``i % world_size == rank``.  Every batch is still drawn from the
    loader, so loaders with stateful shuffling or augmentation stay in step across ranks.
    """
    data = DataPass(fisher=fisher, batches=batches, samples=samples, seed=seed, device=device)
    return data.layer_calls(model, loader, targets, shard)
