"""Coverage matrix: which models each method prunes, and how exactly.

For every torchvision classification model (``torchvision.models.list_models(module=
torchvision.models)``), a set of timm models and small Hugging Face transformers, with random
weights and a tiny random batch (2 images at 64x64, or the model's natural size when it
refuses 64x64; 2 sequences of 32 tokens), one subprocess per model measures:

* the EigenDamage target policy (layers reparameterised / left dense, and why);
* ``eigendamage.run_pruning(method="eigendamage", ratio=0.5, fisher_batches=1)``:
  params and FLOPs kept;
* save/load: the pruned model written by ``save_model`` and read by ``load_model`` gives
  identical outputs and is an instance of the original class;
* ``to_eigenbasis`` output equivalence: max abs difference to the original in eval mode;
* channel methods ``l1`` and ``kron-obs`` at ``ratio=0.5`` (through the dependency graph).

Results go to ``docs/coverage.json`` (one entry per model, reused by later runs unless
``--rerun``) and the table to ``docs/coverage.md``.  Each model has a wall-clock limit
(``--timeout``); stages finished before it are kept.  Run::

    python benchmarks/coverage.py --jobs 2 --threads 1 # everything (hours on 2 CPU cores)
    python benchmarks/coverage.py --only torchvision:resnet18 timm:resnet18 --rerun
    python benchmarks/coverage.py --render             # table from the JSON only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RATIO = 0.5
CHANNEL_METHODS = ("l1", "kron-obs")
TIMM = [
    "timm:vit_small_patch16_224",
    "timm:convnext_atto",
    "timm:efficientnet_b0",
    "timm:tf_efficientnet_b0",
    "timm:mobilenetv3_small_100",
    "timm:resnet18",
    "timm:resnet10t",
    "timm:regnetx_002",
]
_BERT = dict(
    num_hidden_layers=2,
    hidden_size=128,
    num_attention_heads=4,
    intermediate_size=512,
    vocab_size=1000,
)
_GPT2 = dict(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=128)
HF: dict[str, dict[str, Any]] = {
    "hf:bert-base-uncased": _BERT,
    "hf:roberta-base": {**_BERT, "max_position_embeddings": 130},
    "hf:distilbert-base-uncased": dict(
        n_layers=2, dim=128, n_heads=4, hidden_dim=512, vocab_size=1000
    ),
    "hf:gpt2": _GPT2,
    "hf-lm:gpt2": _GPT2,
    "hf-lm:llama": dict(
        num_hidden_layers=2,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    ),
}
SEQ_LEN = 32


# Run last, so that a long run reports the many quick models first.
HEAVY = ("vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_x_32gf")


def all_models() -> list[str]:
    import torchvision

    tv = torchvision.models.list_models(module=torchvision.models)
    tv = [n for n in tv if n not in HEAVY] + [n for n in HEAVY if n in tv]
    return TIMM + list(HF) + [f"torchvision:{n}" for n in tv]


# --------------------------------------------------------------------------- one model


def _error(exc: BaseException) -> dict[str, str]:
    text = " ".join(str(exc).split())
    return {"error": f"{type(exc).__name__}: {text[:300]}"}


def _inputs(model: Any, name: str) -> tuple[Any, Any]:
    """A batch of 2 and its labels: tokens for HF, else 64x64 images if the model takes them."""
    import torch

    from eigendamage.models.registry import example_input

    g = torch.Generator().manual_seed(0)
    spec = model.eigendamage_spec
    if spec.get("input_kind") == "tokens":
        x = torch.randint(0, spec["vocab_size"], (2, SEQ_LEN), generator=g)
        lm = name.startswith("hf-lm:")
        y = torch.randint(0, spec["vocab_size"], (2, SEQ_LEN) if lm else (2,), generator=g)
        return x, y
    y = torch.randint(0, 10, (2,), generator=g)
    small = torch.randn(2, spec["input_size"][0], 64, 64, generator=g)
    try:
        with torch.no_grad():
            model.eval()(small)
        return small, y
    except Exception:  # the model needs its own resolution (ViT, MaxViT, Inception)
        return example_input(model, 2), y


def _calibrate_batchnorm(model: Any, x: Any) -> None:
    """Set BatchNorm running statistics to those of ``x``.  At random init they are (0, 1)
    and activations of deep nets shrink to ~0 in eval mode, which would make every
    output-equivalence check vacuous; calibrated, outputs have their natural scale."""
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass sets the statistics of x
    with torch.no_grad():
        model.train()(x)
    model.eval()
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def _randomize_zero_weights(model: Any) -> None:
    """Give all-zero weight matrices small random values.

    Why: torchvision's ViTs initialise their head to zeros, so every output is 0 and each
    output comparison (reparameterisation, save/load) would pass vacuously.
    """
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g).to(p))


def _float64_equivalence(model: Any, kfe: dict[str, Any], x: Any) -> tuple[float, float]:
    """Relative max differences of the KFE rewrite in float64, with the eigenvectors
    re-orthonormalised (QR) in float64: of the network's output, and the worst of every
    rewritten layer's output against the dense layer's on the same input.

    Why: the float32 check mixes two round-offs that say nothing about the surgery -- the
    eigenvectors of a float32 ``eigh`` are orthogonal only to ~1e-7, and float32 weights
    carry ~1e-7 rounding -- which deep random networks amplify (EfficientNet: ~1e-3 of the
    output).  In float64 with orthonormal bases an exact rewrite must agree to ~1e-12; the
    per-layer figure holds even where the network amplifies float64 round-off itself
    (:func:`_float64_sensitivity`).

    Each layer is swapped for a ``LazyBottleneck``, which builds its float64 bottleneck
    with the same ``factor -> rotate -> build`` calls as ``to_eigenbasis`` at call time and
    drops it after: the whole network still runs rewritten end to end, but only one float64
    bottleneck exists at a time (ViT-L's, all at once, did not fit in 24 GB).
    """
    import torch

    from eigendamage.curvature.factors import KFE, Eigen
    from eigendamage.modelcall import logits_of
    from eigendamage.surgery.eigenbasis import build_form as build
    from eigendamage.surgery.eigenbasis import in_eigenbasis as rotate
    from eigendamage.surgery.eigenbasis import layer_path, set_submodule
    from eigendamage.surgery.eigenbasis import to_factored as factor

    def orthonormal(e: Any) -> Any:
        return Eigen(torch.linalg.qr(e.Q.double())[0], e.lam.double())

    worst_layer = [0.0]

    class LazyBottleneck(torch.nn.Module):
        """A float64 layer that runs as its KFE bottleneck, built afresh on every call."""

        def __init__(self, layer: Any, basis: Any):
            super().__init__()
            self.layer, self.basis = layer, basis

        def forward(self, x: Any) -> Any:
            b = self.basis
            basis = KFE(orthonormal(b.A), orthonormal(b.S), b.diag)
            out = build(rotate(factor(self.layer), basis), "full")(x)
            dense = self.layer(x)
            rel = (out - dense).abs().max() / dense.abs().max().clamp_min(1e-300)
            worst_layer[0] = max(worst_layer[0], float(rel))
            return out

    model64 = copy.deepcopy(model).double()
    inputs = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        reference = logits_of(model64(inputs))
        for core_name, basis in kfe.items():
            path = layer_path(core_name, model64)
            set_submodule(model64, path, LazyBottleneck(model64.get_submodule(path), basis))
        out = logits_of(model64(inputs))
    scale = reference.abs().max().clamp_min(1e-30)
    return float((out - reference).abs().max() / scale), worst_layer[0]


def _float64_sensitivity(model: Any, x: Any) -> float:
    """Relative output change of the float64 network when every weight is multiplied by
    ``1 + 1e-15 * noise``: how far float64 round-off alone moves its outputs.

    Why: some random-init networks are chaotic (EfficientNet-V2-L with calibrated
    BatchNorm: 9e-2), so no end-to-end comparison can tell an exact rewrite from round-off
    there; the per-layer check of :func:`_float64_equivalence` then decides.
    """
    import torch

    from eigendamage.modelcall import logits_of

    model64 = copy.deepcopy(model).double()
    inputs = x.double() if x.is_floating_point() else x
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        reference = logits_of(model64(inputs))
        for t in model64.parameters():
            t.mul_(1 + 1e-15 * torch.randn(t.shape, generator=g, dtype=t.dtype))
        out = logits_of(model64(inputs))
    return float((out - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def _kept(before: Any, after: Any) -> dict[str, float]:
    return {"params_kept": after.params / before.params, "flops_kept": after.flops / before.flops}


def _max_diff(a: Any, b: Any) -> float:
    from eigendamage.modelcall import logits_of

    return float((logits_of(a).float() - logits_of(b).float()).abs().max())


def _eigendamage_tokens(model: Any, loader: list, x: Any, exclude: set[str]) -> tuple[Any, Any]:
    """The steps of ``pruner.eigendamage_round`` for token models: ``run_pruning`` counts
    FLOPs on a float input of ``input_shape``, which an embedding layer refuses."""
    from eigendamage.criteria.eigendamage import (
        apply_plan,
        direction_scores,
        eigendamage_targets,
        plan_pruning,
        rotated_layers,
    )
    from eigendamage.curvature import collect_kfac, eigendecompose

    targets = eigendamage_targets(model, exclude, example_inputs=x[:1])
    factors = collect_kfac(model, loader, conv_mode="channel", modules=targets, batches=1)
    kfe = eigendecompose(factors, drop_bias=True)
    rotated = rotated_layers(model, kfe)
    scores = {n: direction_scores(rotated[n], kfe[n]) for n in kfe}
    plan = plan_pruning(rotated, scores, ratio=RATIO)
    return apply_plan(copy.deepcopy(model), rotated, plan), kfe


@contextlib.contextmanager
def _recorded_eigenbases() -> Iterator[dict[str, Any]]:
    """Keep the eigenbases ``run_pruning`` computes, so the ``to_eigenbasis`` check reuses
    them instead of paying for the eigendecompositions (most of the time) twice."""
    from eigendamage.methods import eigendamage as pruner

    seen: dict[str, Any] = {}
    original = getattr(pruner, "stable_eigendecompose", None)
    if original is None:  # another pruner version: the check recomputes the bases
        yield seen
        return

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen["kfe"] = original(*args, **kwargs)
        return seen["kfe"]

    pruner.stable_eigendecompose = recording
    try:
        yield seen
    finally:
        pruner.stable_eigendecompose = original


def run_one(name: str, emit: Any) -> None:
    """Measure one model; ``emit(row)`` after every stage so a timeout keeps what is done."""
    import torch
    from torch import nn

    from eigendamage.criteria.eigendamage import classifier_name, target_policy
    from eigendamage.curvature import collect_kfac, eigendecompose
    from eigendamage.io import load_model, save_model
    from eigendamage.measure import count
    from eigendamage.methods import run_pruning
    from eigendamage.methods.channel import channel_prune
    from eigendamage.modelcall import logits_of
    from eigendamage.models import create_model
    from eigendamage.surgery.eigenbasis import to_eigenbasis

    torch.manual_seed(0)
    device = torch.device(os.environ.get("COVERAGE_DEVICE", "cpu"))
    row: dict[str, Any] = {"model": name, "seconds": {}, "machine": _machine(device)}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        row["seconds"][stage] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()
        emit(row)

    model = create_model(name, num_classes=10, **HF.get(name, {})).eval().to(device)
    tokens = model.eigendamage_spec.get("input_kind") == "tokens"
    _randomize_zero_weights(model)
    x, y = (t.to(device) for t in _inputs(model, name))
    _calibrate_batchnorm(model, x)
    loader = [(x, y)]
    row["input"] = list(x.shape)
    before = count(model, example_inputs=x[:1])
    row["params"] = before.params
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    cls = classifier_name(model)
    targets, skipped = target_policy(model, {cls}, example_inputs=x[:1])
    row.update(layers=len(layers), targets=len(targets), classifier=cls)
    row["skipped"] = dict(Counter(re.split(r" \(|:|,", r)[0] for r in skipped.values()))
    lap("build")

    kfe = None
    try:
        if tokens:
            pruned, kfe = _eigendamage_tokens(model, loader, x, {cls})
            after = count(pruned, example_inputs=x[:1])
            row["eigendamage"] = {**_kept(before, after), "via": "criteria pipeline"}
        else:
            with _recorded_eigenbases() as seen:
                result = run_pruning(
                    model, loader, method="eigendamage", ratio=RATIO, fisher_batches=1,
                    input_shape=(1, *x.shape[1:]),
                )  # fmt: skip
            kfe = seen.get("kfe")
            pruned = result.model
            row["eigendamage"] = _kept(result.before, result.after)
            row["eigendamage"]["forms"] = dict(Counter(result.rounds[0].detail["forms"].values()))
    except Exception as exc:
        row["eigendamage"] = _error(exc)
        pruned = None
    lap("eigendamage")

    if pruned is not None:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                save_model(pruned, tmp)
                loaded = load_model(tmp).eval().to(device)
            with torch.no_grad():
                diff = _max_diff(loaded(x), pruned.eval()(x))
            row["save_load"] = {"max_abs_diff": diff, "same_class": type(loaded) is type(model)}
        except Exception as exc:
            row["save_load"] = _error(exc)
        lap("save_load")

    try:
        if kfe is None:
            factors = collect_kfac(model, loader, conv_mode="channel", modules=targets)
            kfe = eigendecompose(factors, drop_bias=True)
        pruned = result = None  # the float64 check below copies the model twice: free memory
        rotated = to_eigenbasis(model, kfe).eval()
        with torch.no_grad():
            reference = model(x)
            row["reparam"] = {
                "max_abs_diff": _max_diff(rotated(x), reference),
                "output_scale": float(logits_of(reference).abs().max()),
            }
        del rotated
        end_to_end, per_layer = _float64_equivalence(model, kfe, x)
        row["reparam"].update(float64_rel_diff=end_to_end, float64_layer_rel_diff=per_layer)
        if end_to_end > REPARAM_TOLERANCE:  # round-off, or a wrong rewrite?
            row["reparam"]["float64_sensitivity"] = _float64_sensitivity(model, x)
    except Exception as exc:
        row["reparam"] = _error(exc)
    lap("reparam")

    for method in CHANNEL_METHODS:
        try:
            if tokens:
                pruned, info = channel_prune(
                    model, loader, method=method, example_inputs=x[:1], ratio=RATIO,
                    fisher_batches=1, ignored_layers=[cls],
                )  # fmt: skip
                row[method] = _kept(before, count(pruned, example_inputs=x[:1]))
            else:
                result = run_pruning(
                    model, loader, method=method, ratio=RATIO, fisher_batches=1,
                    input_shape=(1, *x.shape[1:]),
                )  # fmt: skip
                pruned = result.model
                row[method] = _kept(result.before, result.after)
            with tempfile.TemporaryDirectory() as tmp:
                save_model(pruned, tmp)
                loaded = load_model(tmp).eval().to(device)
            with torch.no_grad():
                row[method]["save_load_diff"] = _max_diff(loaded(x), pruned.eval()(x))
        except Exception as exc:
            row[method] = {**row.get(method, {}), **_error(exc)}
        lap(method)


# --------------------------------------------------------------------------- driver


def worker(name: str) -> None:
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(int(os.environ.get("COVERAGE_THREADS", "2")))
    run_one(name, lambda row: print("ROW " + json.dumps(row), flush=True))


def _machine(device: Any) -> str:
    import torch

    where = f"{os.cpu_count()} CPU cores"
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    return f"{where}, torch {torch.__version__}, python {platform.python_version()}"


def measure(name: str, timeout: float, threads: int, device: str = "cpu") -> dict[str, Any]:
    """Run one model in a subprocess; the last row it printed, plus the timeout if hit."""
    cmd = [sys.executable, __file__, "--worker", name]
    env = {**os.environ, "COVERAGE_THREADS": str(threads), "COVERAGE_DEVICE": device}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
        )
        out, err, timed_out = proc.stdout, proc.stderr, False
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err, timed_out = "", True
    rows = [line[4:] for line in out.splitlines() if line.startswith("ROW ")]
    row = json.loads(rows[-1]) if rows else {"model": name, "seconds": {}}
    row["wall_seconds"] = round(time.perf_counter() - start, 1)
    if timed_out:
        row["timeout"] = timeout
    elif not rows or "kron-obs" not in row:
        last = err.strip().splitlines()[-1] if err.strip() else "no output"
        row["crash"] = last[:300]
    return row


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="model names (default: all)")
    parser.add_argument("--rerun", action="store_true", help="ignore cached results")
    parser.add_argument("--render", action="store_true", help="only write the markdown table")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per model")
    parser.add_argument("--jobs", type=int, default=1, help="model processes at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: where models run")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "coverage.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    results = load_results(args.json)
    if not args.render:
        todo = [n for n in args.only or all_models() if args.rerun or n not in results]
        lock = threading.Lock()

        def one(name: str) -> None:
            row = measure(name, args.timeout, args.threads, args.device)
            with lock:
                results[name] = row
                print(summary_line(row), flush=True)
                args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, todo))
    args.out.write_text(render(results))


# --------------------------------------------------------------------------- report

REPARAM_TOLERANCE = 1e-6  # float64 check, relative to the output's max magnitude
LAYER_TOLERANCE = 1e-10  # float64 check of each rewritten layer on its own input


def eigendamage_ok(row: dict[str, Any]) -> bool:
    ed, sl, rp = row.get("eigendamage", {}), row.get("save_load", {}), row.get("reparam", {})
    if "params_kept" not in ed or "max_abs_diff" not in sl or "float64_rel_diff" not in rp:
        return False
    nonzero = rp.get("output_scale", 0.0) > 0  # an all-zero output proves nothing
    return nonzero and sl["max_abs_diff"] == 0.0 and (_exact_end_to_end(rp) or _chaotic(rp))


def _exact_end_to_end(rp: dict[str, Any]) -> bool:
    return rp["float64_rel_diff"] <= REPARAM_TOLERANCE


def _chaotic(rp: dict[str, Any]) -> bool:
    """The network itself moves by more than the tolerance under float64 round-off, and
    every rewritten layer is exact on its own input."""
    layers_exact = rp.get("float64_layer_rel_diff", 1.0) <= LAYER_TOLERANCE
    return rp.get("float64_sensitivity", 0.0) > REPARAM_TOLERANCE and layers_exact


def failure(row: dict[str, Any]) -> str:
    """The first reason a model is not ok under EigenDamage, with the row's ``note`` (what
    was tried and why it could not be finished), when the JSON has one."""
    reason = _first_failure(row)
    return f"{reason}. {row['note']}" if row.get("note") else reason


def _first_failure(row: dict[str, Any]) -> str:
    for key in ("eigendamage", "save_load", "reparam"):
        if "error" in row.get(key, {}):
            return f"{key}: {row[key]['error']}"
    if "timeout" in row:
        return f"timeout after {row['timeout']:.0f} s (stages done: {', '.join(row['seconds'])})"
    if "crash" in row:
        return f"crash: {row['crash']}"
    sl = row.get("save_load", {})
    if sl.get("max_abs_diff", 0) != 0:
        return f"save/load changed outputs by {sl['max_abs_diff']:.2e}"
    if row.get("reparam", {}).get("output_scale", 1.0) == 0:
        return "the model's outputs are all zero on the probe: the checks prove nothing"
    rp = row.get("reparam", {})
    text = f"float64 reparameterisation differs by {rp.get('float64_rel_diff')} (relative)"
    if "float64_layer_rel_diff" in rp:
        text += f", worst layer by {rp['float64_layer_rel_diff']:.1e}"
    if "float64_sensitivity" in rp:
        text += f"; float64 round-off alone moves the output by {rp['float64_sensitivity']:.1e}"
    return text


def _cell(result: dict[str, Any] | None) -> str:
    if not result:
        return "–"
    if "error" in result and "params_kept" not in result:
        return "fail¹"
    text = f"{1 - result['params_kept']:.0%} / {1 - result['flops_kept']:.0%}"
    if result.get("save_load_diff", 0) != 0 or "error" in result:
        text += " ²"
    return text


def _reparam_cell(rp: dict[str, Any]) -> str:
    if "max_abs_diff" not in rp:
        return "–"
    text = f"{rp['max_abs_diff']:.1e} ({rp['output_scale']:.2g})"
    if "float64_rel_diff" in rp:
        text += f"; {rp['float64_rel_diff']:.0e}"
    if _chaotic(rp) and not _exact_end_to_end(rp):
        text += (
            f" ³ (round-off alone: {rp['float64_sensitivity']:.0e}; "
            f"layers: {rp['float64_layer_rel_diff']:.0e})"
        )
    return text


def summary_line(row: dict[str, Any]) -> str:
    status = "ok" if eigendamage_ok(row) else "FAIL " + failure(row)
    return f"{row['model']}: {status} ({row.get('wall_seconds', 0):.0f} s)"


UNRECORDED = "2 CPU cores, torch 2.14.1 (machine not recorded)"


def on_gpu(row: dict[str, Any]) -> bool:
    return "NVIDIA" in row.get("machine", "")


def render(results: dict[str, dict[str, Any]]) -> str:
    families = {
        "torchvision": [r for n, r in results.items() if n.startswith("torchvision:")],
        "timm": [r for n, r in results.items() if n.startswith("timm:")],
        "transformers": [r for n, r in results.items() if n.startswith("hf")],
    }
    lines = [
        "# Coverage: which models each method prunes",
        "",
        "Generated by `python benchmarks/coverage.py` (raw results: `docs/coverage.json`), "
        "random weights. Machines: "
        + "; ".join(
            f"{m} ({n} models{', marked † in the s column' if 'NVIDIA' in m else ''})"
            for m, n in Counter(r.get("machine", UNRECORDED) for r in results.values()).items()
        )
        + ".",
        "",
        "Per model: a batch of 2 random inputs (64x64 images, or the model's own size when it "
        "refuses 64x64: ViT, MaxViT, Inception v3 use 224/299; 32 tokens for transformers), "
        f"one Fisher batch, pruning ratio {RATIO} (EigenDamage: fraction of eigen-directions; "
        "channel methods: fraction of channels). FLOPs are counted at that input size. Each "
        "model runs in its own process under a wall-clock limit. Rows were measured over "
        "several commits (rerun one with `--rerun --only NAME`): the removed fractions of rows "
        "measured before the rank-aware eigendecomposition can differ, because factors from "
        "a batch of 2 are rank-deficient and the exact null-space eigenvalues it returns "
        "rank near-null directions differently; the exactness checks do not depend on it.",
        "",
        "* **EigenDamage ok** = `run_pruning(method='eigendamage')` succeeded, `to_eigenbasis` "
        "is exact -- in float64, with the eigenvectors re-orthonormalised, outputs agree to "
        f"≤ {REPARAM_TOLERANCE:g} relative (deep random networks amplify even float64 "
        "round-off: EfficientNet-V2-M reaches 3e-7; a wrong rewrite differs by O(1)) -- and "
        "`save_model` → `load_model` of the pruned "
        "model gives *identical* outputs. The reparam column shows the float32 difference "
        "(and the output's max): float32 eigenvectors are orthogonal only to ~1e-7 and deep "
        "random networks amplify such round-off (EfficientNet-B1: ~1e-3 of its output), "
        "then the float64 relative difference.",
        "* `³`: a network so chaotic at random init that float64 round-off alone moves its "
        "output by more than the tolerance (every weight times `1 + 1e-15 noise`: the "
        "'round-off alone' figure), so the end-to-end comparison cannot decide; there every "
        f"rewritten layer must match the dense layer on its own input to ≤ {LAYER_TOLERANCE:g} "
        "relative ('layers').",
        "* **targets** = layers EigenDamage reparameterises / all `nn.Linear`+`nn.Conv2d` "
        "(the classifier is excluded by default; the others left dense are listed with their "
        "reason under the table, policy in `criteria/eigendamage.py`).",
        "* **removed** cells: params removed / FLOPs removed. `fail¹`: see the failure list; "
        "`²`: pruned, but the save/load round trip failed or changed outputs.",
        "* Transformers: `run_pruning` cannot count FLOPs of token models yet (it draws a "
        "float input of `input_shape`); their EigenDamage column runs the same steps "
        "(`eigendamage_targets` → `collect_kfac` → `eigendecompose` → `plan_pruning` → "
        "`apply_plan`) and their channel columns call `channel_prune` with token inputs.",
        "",
    ]
    failures: list[str] = []
    skips: dict[str, set[str]] = {}
    for family, rows in families.items():
        if not rows:
            continue
        ok = sum(eigendamage_ok(r) for r in rows)
        lines += [f"## {family}: EigenDamage ok on {ok} / {len(rows)}", ""]
        lines += [
            "| model | params | input | targets | EigenDamage removed | reparam: float32 max abs "
            "diff (output max); float64 relative "
            "| save/load | " + " | ".join(f"{m} removed" for m in CHANNEL_METHODS) + " | s |",
            "|---|---:|---|---:|---:|---:|---|" + "---:|" * len(CHANNEL_METHODS) + "---:|",
        ]
        for row in sorted(rows, key=lambda r: r["model"]):
            name = row["model"].split(":", 1)[1] if family != "transformers" else row["model"]
            ok = eigendamage_ok(row)
            if not ok:
                failures.append(f"* `{row['model']}`: {failure(row)}")
            for method in CHANNEL_METHODS:
                if "error" in row.get(method, {}):
                    failures.append(f"* `{row['model']}` {method}: {row[method]['error']}")
            if ok and ("crash" in row or "timeout" in row):  # after the EigenDamage checks
                stopped = row.get("crash") or f"timeout after {row['timeout']:.0f} s"
                failures.append(f"* `{row['model']}` channel methods: {stopped}")
            for reason in row.get("skipped", {}):
                skips.setdefault(reason, set()).add(name)
            rp = row.get("reparam", {})
            sl = row.get("save_load", {})
            save = "–"
            if "max_abs_diff" in sl:
                same = "same class" if sl.get("same_class") else "other class"
                save = f"{'identical' if sl['max_abs_diff'] == 0 else 'DIFFERS'}, {same}"
            elif sl:
                save = "fail¹"
            cells = [
                f"{'✅' if ok else '❌'} {name}",
                f"{row.get('params', 0) / 1e6:.1f}M",
                "×".join(str(s) for s in row.get("input", [])[1:]),
                f"{row.get('targets', '?')}/{row.get('layers', '?')}",
                _cell(row.get("eigendamage")),
                _reparam_cell(rp),
                save,
                *(_cell(row.get(m)) for m in CHANNEL_METHODS),
                f"{row.get('wall_seconds', 0):.0f}" + (" †" if on_gpu(row) else ""),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Layers left dense by EigenDamage, by reason", ""]
    for reason, names in sorted(skips.items()):
        shown = ", ".join(sorted(names))
        lines.append(f"* **{reason}** ({len(names)} models): {shown}")
    lines += ["", "## Failures (¹)", ""] + (failures or ["None."]) + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
