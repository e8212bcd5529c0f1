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
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, CurvatureError, DataError, ModelError

FISHER_TYPES = ("true", "empirical")
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)
# Subclasses known to compute exactly their base class's forward.
_PLAIN_SUBCLASSES = ("timm.layers.linear.Linear",)


def is_plain_layer(module: nn.Module) -> bool:
    """True when ``module`` computes exactly the plain nn.Linear/nn.Conv2d of its weights.

    Why: the factors are built from the layer's input as the hook sees it; a subclass with
    its own forward (timm's ``Conv2dSame`` pads inside it) would get silently wrong ones.
    """
    cls = type(module)
    if cls in SUPPORTED_LAYERS or f"{cls.__module__}.{cls.__qualname__}" in _PLAIN_SUBCLASSES:
        return True
    if isinstance(module, nn.Conv2d):
        return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward
    return isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward


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
            if not isinstance(named[name], SUPPORTED_LAYERS):
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


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: object, device: torch.device) -> object:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def call_model(model: nn.Module, inputs: object) -> torch.Tensor:
    """Run the model on a batch's inputs and return its logits."""
    if isinstance(inputs, dict):
        out = model(**inputs)
    elif isinstance(inputs, (list, tuple)):
        out = model(*inputs)
    else:
        out = model(inputs)
    return logits_of(out)


def logits_of(out: object) -> torch.Tensor:
    """Logits from a plain tensor, a HF-style output with ``.logits`` or a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelError(
        f"cannot find logits in a model output of type {type(out).__name__}; "
        "return a tensor, a tuple starting with the logits, or an object with .logits"
    )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, restoring every submodule's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


IGNORE_INDEX = -100  # cross-entropy's "no label here" (padding tokens)


def check_labels(labels: object, num_classes: int, where: str) -> None:
    """Class labels must lie in ``[0, num_classes)`` (or be ``IGNORE_INDEX``).

    Why: cross-entropy fails on others with a bare ``IndexError`` on the CPU and a device
    assert that poisons the CUDA context on a GPU; this names the value and the classes.
    Soft (floating-point) targets are not class labels and pass unchecked.
    """
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        return
    bad = (labels >= num_classes) | ((labels < 0) & (labels != IGNORE_INDEX))
    if bad.any():
        value = int(labels[bad].flatten()[0])
        raise DataError(
            f"{where}: label {value} is outside [0, {num_classes}): the model has "
            f"{num_classes} classes; the dataset's labels do not match the model's output "
            "layer (use a model built for this dataset, or remap the labels)"
        )


def _sampled_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over examples (and tokens) of the negative log-likelihood of ``labels``."""
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # low-precision logits: take the loss in fp32
    return F.cross_entropy(flat, labels.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX)


def iterate_layer_calls(
    model: nn.Module,
    loader: Iterable,
    targets: dict[str, nn.Module],
    *,
    fisher: str = "true",
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
    if fisher not in FISHER_TYPES:
        raise ConfigError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if fisher == "empirical" and samples != 1:
        raise ConfigError("the empirical Fisher uses the dataset labels: samples must be 1")
    if batches is not None and batches < 1:
        raise ConfigError(f"batches must be >= 1 or None, got {batches}")
    rank, world = shard if shard is not None else (0, 1)
    if not 0 <= rank < world:
        raise ConfigError(f"shard must be (rank, world_size) with 0 <= rank < world, got {shard}")
    device = torch.device(device) if device is not None else model_device(model)
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
                inputs, labels = _split_batch(batch, step)
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
                if fisher == "empirical":
                    check_labels(labels, logits.shape[-1], f"batch {step} of the loader")
                    draws = [to_device(labels, device)]
                else:
                    generator.manual_seed(batch_seed(seed, step))
                    with torch.no_grad():
                        probs = torch.softmax(logits.detach().float(), dim=-1)
                        flat = probs.reshape(-1, probs.shape[-1])
                        draws = [
                            torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
                            for _ in range(samples)
                        ]
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
                    per_layer: dict[str, list[LayerCall]] = {}
                    it = iter(grads)
                    for n in targets:
                        per_layer[n] = []
                        for inp, out in records[n]:
                            g = next(it)
                            if g is None:
                                g = torch.zeros_like(out)
                            per_layer[n].append(LayerCall(inp, g.detach(), k, step))
                    yield logits.shape[0], per_layer
    finally:
        for h in handles:
            h.remove()
        for calls in records.values():
            calls.clear()


def _split_batch(batch: object, step: int) -> tuple[object, object]:
    if isinstance(batch, dict) and "labels" in batch:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ConfigError(
        f"batch {step} of the loader is a {type(batch).__name__}; expected (inputs, targets) "
        "pairs or a dict with 'labels'"
    )
