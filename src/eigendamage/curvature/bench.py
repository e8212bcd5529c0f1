"""Measurements behind ``eigendamage bench kfac|eigh|prune-step`` and ``benchmarks/``.

Every benchmark runs the variants it compares *side by side in one process*, interleaved
round by round (A, B, A, B, ...), and keeps the minimum over rounds: on a shared machine
the minimum is the run least disturbed by other processes, and interleaving exposes every
variant to the same background load.  Each report starts with the machine, torch version
and settings, so a table is never separated from how it was produced.

Inputs are synthetic (seeded Gaussian images, uniform labels): speed does not depend on
the pixel values, and no dataset download is needed.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, unknown_name
from .eigen import batched_eigh, low_rank_bound
from .factors import KFactors
from .kfac import collect_kfac


@dataclass(frozen=True)
class Workload:
    """A model at its usual input size and batch size."""

    model: str
    input_shape: tuple[int, int, int]
    batch_size: int
    classes: int


WORKLOADS: dict[str, Workload] = {
    "digits-vgg": Workload("digits-vgg", (1, 8, 8), 128, 10),
    "vgg19-cifar": Workload("vgg19", (3, 32, 32), 128, 10),
    "resnet18-32px": Workload("torchvision:resnet18", (3, 32, 32), 512, 10),
    "resnet50-224": Workload("torchvision:resnet50", (3, 224, 224), 64, 1000),
    "vit-s": Workload("timm:vit_small_patch16_224", (3, 224, 224), 64, 1000),
}


def workload(key: str) -> Workload:
    if key not in WORKLOADS:
        raise ConfigError(unknown_name("workload", key, list(WORKLOADS)))
    return WORKLOADS[key]


def build(key: str, device: str, batch_size: int | None = None) -> tuple[nn.Module, Workload]:
    from ..models import create_model

    w = workload(key)
    if batch_size is not None:
        w = Workload(w.model, w.input_shape, batch_size, w.classes)
    torch.manual_seed(0)  # the same weights in every run: factors (and eigh) are repeatable
    model = create_model(w.model, num_classes=w.classes, in_channels=w.input_shape[0])
    return model.to(device).eval(), w


def synthetic_batches(w: Workload, count: int, device: str, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(w.batch_size, *w.input_shape, generator=g).to(device),
            torch.randint(0, w.classes, (w.batch_size,), generator=g).to(device),
        )
        for _ in range(count)
    ]


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def machine(device: str) -> str:
    """One line naming what produced a table: host, CPU/GPU, torch, threads, load."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "no GPU used"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores ({gpu}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, python {platform.python_version()}; "
        f"load average at start {load:.1f}"
    )


def load_now() -> str:
    """1-minute load average, reported next to timings taken on a shared machine."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def best_of(variants: dict[str, Callable[[], object]], repeats: int, device: str) -> dict:
    """Minimum seconds per variant over ``repeats`` interleaved rounds."""
    best = {k: float("inf") for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def plain_step(model: nn.Module, data: Sequence) -> None:
    """Forward + backward with parameter gradients: the cost of an ordinary training step
    without the optimizer (eval mode, like the curvature pass)."""
    for x, y in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def markdown(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- K-FAC vs plain


def bench_kfac(
    keys: Sequence[str],
    *,
    batches: int = 3,
    repeats: int = 3,
    device: str = "cpu",
    modes: Sequence[str] = ("channel", "patch"),
    channels_last: bool = False,
) -> list[dict]:
    """K-FAC collection (true Fisher, one draw) vs plain forward+backward, same batches."""
    return [_kfac_row(k, batches, repeats, device, modes, channels_last) for k in keys]


def flop_model(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """GEMM multiply-adds of one pass, from the layer shapes (other ops ignored): forward,
    backward to the inputs, backward to the weights, and the K-FAC factor GEMMs.

    Per layer with ``M`` output rows: weight gradient ``d_in*d_out*M`` (``d_in`` includes
    the kernel); ``S``: ``d_out^2 * M``; channel ``A``: ``c_in^2`` per pixel read; patch
    ``A``: ``d_in^2 * M``.  Explains ratios that no implementation can beat: e.g. a 1x1
    conv expanding ``C -> 4C`` spends ``16 C^2`` per row on ``S`` against ``4 C^2`` for
    its weight gradient.
    """
    from .hooks import resolve_targets

    totals = dict.fromkeys(
        ("forward", "input grad", "weight grad", "S", "A channel", "A patch"), 0.0
    )
    first = True

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal first
        inp = args[0]
        if isinstance(module, nn.Conv2d):
            g = module.groups
            rows = out.shape[0] * out.shape[-1] * out.shape[-2]
            d_in = module.in_channels // g * module.kernel_size[0] * module.kernel_size[1]
            d_out = module.out_channels // g
            c_in = module.in_channels // g
            read = (
                inp.shape[0]
                * inp.shape[-1]
                * inp.shape[-2]
                / max(1, module.stride[0] * module.stride[1] if d_in == c_in else 1)
            )
        else:
            g, rows = 1, out.numel() // out.shape[-1]
            d_in = c_in = module.in_features
            d_out, read = module.out_features, rows
        mac = g * d_in * d_out * rows
        totals["forward"] += mac
        totals["weight grad"] += mac
        totals["input grad"] += 0 if first else mac
        totals["S"] += g * d_out**2 * rows
        totals["A channel"] += g * c_in**2 * read
        totals["A patch"] += g * d_in**2 * rows
        first = False

    handles = [m.register_forward_hook(hook) for m in resolve_targets(model, None).values()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return totals


def _kfac_row(
    key: str, batches: int, repeats: int, device: str, modes: Sequence[str], channels_last: bool
) -> dict:
    model, w = build(key, device)
    data = synthetic_batches(w, batches, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        data = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in data]
    plain_step(model, data[:1])  # warm-up (allocator, oneDNN primitive caches)
    variants: dict[str, Callable[[], object]] = {"plain": lambda: plain_step(model, data)}
    for mode in modes:
        variants[mode] = lambda mode=mode: collect_kfac(model, data, conv_mode=mode)
    t = best_of(variants, repeats, device)
    flops = flop_model(model, data[0][0])
    plain = flops["forward"] + flops["input grad"] + flops["weight grad"]
    row = {"workload": key, "batch": w.batch_size, "batches": batches}
    row["plain fwd+bwd s"] = f"{t['plain']:.2f}"
    for mode in modes:
        row[f"K-FAC {mode} s"] = f"{t[mode]:.2f}"
        row[f"{mode} / plain"] = f"{t[mode] / t['plain']:.2f}x"
        kfac = flops["forward"] + flops["input grad"] + flops["S"] + flops[f"A {mode}"]
        row[f"{mode} GEMM model"] = f"{kfac / plain:.2f}x"
    row["load avg"] = load_now()
    return row


def peak_memory_mib(key: str, variant: str, batches: int, device: str = "cpu") -> float:
    """Peak memory of one pass, in MiB above what model and data already hold.

    CPU: in a fresh subprocess, the RSS high-water mark of the pass (reset before it via
    ``/proc/self/clear_refs``) minus the RSS before it (torch's CPU allocations are
    invisible to tracemalloc).  CUDA: ``max_memory_allocated`` delta.
    """
    if torch.device(device).type == "cuda":
        return _peak_cuda(key, variant, batches, device)
    cmd = [sys.executable, "-m", "eigendamage.curvature.bench", "memory", key, variant]
    # A fixed mmap threshold makes glibc hand freed activation buffers back to the OS, so
    # RSS follows what torch holds instead of what malloc kept cached.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [*cmd, str(batches), device], capture_output=True, text=True, check=True, env=env
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def _pass(key: str, variant: str, batches: int, device: str) -> Callable[[], object]:
    model, w = build(key, device)
    data = synthetic_batches(w, batches, device)
    if variant == "plain":
        return lambda: plain_step(model, data)
    return lambda: collect_kfac(model, data, conv_mode=variant)


def _peak_cuda(key: str, variant: str, batches: int, device: str) -> float:
    run = _pass(key, variant, batches, device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def _memory_child(key: str, variant: str, batches: int, device: str) -> None:
    run = _pass(key, variant, batches, device)
    before = _status_mib("VmRSS")
    try:  # reset the high-water mark, so imports and setup do not count (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        run()
        peak = _status_mib("VmHWM")
    except OSError:
        run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mib": peak - before}))


def bench_memory(keys: Sequence[str], *, batches: Sequence[int] = (2, 6), device: str = "cpu"):
    """Peak memory of plain fwd+bwd and of collection on 2 and 6 batches (streaming: the
    peak must not grow with the number of batches)."""
    rows = []
    for key in keys:
        row: dict = {"workload": key, "batch": workload(key).batch_size}
        row["plain fwd+bwd MiB"] = f"{peak_memory_mib(key, 'plain', 1, device):.0f}"
        for mode in ("channel", "patch"):
            for b in batches:
                row[f"K-FAC {mode}, {b} batch MiB"] = f"{peak_memory_mib(key, mode, b, device):.0f}"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- eigh


def factor_matrices(factors: dict[str, KFactors]) -> list[torch.Tensor]:
    """The matrices EigenDamage decomposes: ``A`` without bias and ``S`` of every layer."""
    return [m for f in factors.values() for m in (f.A_no_bias, f.S)]


def factor_rank_bounds(factors: dict[str, KFactors]) -> list[int]:
    """The rank bounds of :func:`factor_matrices`, in the same order."""
    return [b for f in factors.values() for b in (f.a_rank_bound, f.s_rank_bound)]


def stacked_eigh(mats: Sequence[torch.Tensor], dtype: torch.dtype) -> list | None:
    """One ``torch.linalg.eigh`` per distinct size on the stacked matrices (what a GPU wants);
    None when LAPACK does not converge."""
    by_size: dict[int, list[int]] = {}
    for i, m in enumerate(mats):
        by_size.setdefault(m.shape[-1], []).append(i)
    out: list = [None] * len(mats)
    for d, idx in by_size.items():
        stack = torch.cat([mats[i].reshape(-1, d, d) for i in idx]).to(dtype)
        try:
            lam, q = torch.linalg.eigh(0.5 * (stack + stack.transpose(-1, -2)))
        except torch.linalg.LinAlgError:  # reported as a failed variant, not a crash
            return None
        start = 0
        for i in idx:
            n = mats[i].reshape(-1, d, d).shape[0]
            out[i] = (lam[start : start + n], q[start : start + n])
            start += n
    return out


def single_threaded(fn: Callable[[], list]) -> list:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def eigh_variants(mats: list[torch.Tensor], bounds: list[int]) -> dict[str, Callable[[], list]]:
    """The reference first; "1 thread" separates what threading (and, on a shared machine,
    contention on multi-threaded LAPACK) costs from what precision and scheduling gain;
    "rank bounds" is what ``eigendecompose`` does by default."""
    return {
        "sequential loop, fp64 (reference)": lambda: batched_eigh(mats, batched=False),
        "sequential loop, fp64, 1 thread": lambda: single_threaded(
            lambda: batched_eigh(mats, batched=False)
        ),
        "stacked by size, fp64": lambda: stacked_eigh(mats, torch.float64),
        "stacked by size, fp32": lambda: stacked_eigh(mats, torch.float32),
        "workers, fp64": lambda: batched_eigh(mats, fp32_above=None),
        "workers, fp32 above 1024": lambda: batched_eigh(mats, fp32_above=1024),
        "workers, fp32": lambda: batched_eigh(mats, fp32_above=0),
        "workers, fp32 above 1024, rank bounds (default)": lambda: batched_eigh(
            mats, fp32_above=1024, rank_bounds=bounds
        ),
        "workers, fp32, rank bounds": lambda: batched_eigh(mats, fp32_above=0, rank_bounds=bounds),
    }


def _accuracy(results: list, ref: list, mats: list[torch.Tensor]) -> tuple[float, float]:
    """Worst eigenvalue error and worst reconstruction error, both relative to ``max lam``."""
    lam_err = rec_err = 0.0
    for (lam, q), (lam_ref, _), m in zip(results, ref, mats, strict=True):
        lam, q, m = lam.double().reshape(-1, m.shape[-1]), q.double(), m.double()
        scale = float(lam_ref.double().max().clamp_min(1e-300))
        lam_err = max(
            lam_err, float((lam - lam_ref.double().reshape(lam.shape)).abs().max()) / scale
        )
        q = q.reshape(-1, *m.shape[-2:])
        rec = (q * lam.unsqueeze(-2)) @ q.transpose(-1, -2) - m.reshape(q.shape)
        rec_err = max(rec_err, float(rec.abs().max()) / scale)
    return lam_err, rec_err


def bench_eigh(
    key: str = "resnet50-224",
    *,
    conv_mode: str = "channel",
    batches: int = 1,
    repeats: int = 2,
    device: str = "cpu",
    calibrate: bool = False,
    batch_size: int | None = None,
) -> tuple[list[dict], dict]:
    """All factors of one network (from ``batches`` synthetic batches), decomposed by each
    variant; seconds, speed-up over the sequential float64 loop, and accuracy against it.

    ``calibrate`` also reports how far float32 factors are from float64-accumulated ones
    (on the first 16 examples, to bound memory): the error factors carry before any eigh.
    """
    model, w = build(key, device, batch_size)
    data = synthetic_batches(w, batches, device)
    start = time.perf_counter()
    factors = collect_kfac(model, data, conv_mode=conv_mode)
    collect_s = time.perf_counter() - start
    mats = factor_matrices(factors)
    bounds = factor_rank_bounds(factors)
    variants = eigh_variants(mats, bounds)
    t = best_of(variants, repeats, device)
    ref = variants["sequential loop, fp64 (reference)"]()
    base = t["sequential loop, fp64 (reference)"]
    rows = []
    for name in variants:
        result = variants[name]()
        if result is None:
            rows.append({"variant": name, "seconds": "did not converge (LAPACK error)"})
            continue
        lam_err, rec_err = _accuracy(result, ref, mats)
        rows.append(
            {
                "variant": name,
                "seconds": f"{t[name]:.2f}",
                "speed-up": f"{base / t[name]:.2f}x",
                "max eigenvalue error / max lam": f"{lam_err:.1e}",
                "max reconstruction error / max lam": f"{rec_err:.1e}",
            }
        )
    sizes = sorted((m.shape[-1] for m in mats), reverse=True)
    low = [m.shape[-1] for m, b in zip(mats, bounds, strict=True) if low_rank_bound(m, b)]
    info = {
        "factors": len(mats),
        "low-rank (side)": sorted(low, reverse=True),
        "largest sides": sizes[:8],
        "sum d^3 (G)": round(sum(d**3 for d in sizes) / 1e9, 2),
        "collection s": round(collect_s, 1),
    }
    if calibrate:
        del factors, mats, variants, ref
        info["fp32 factor error / max lam"] = f"{_accumulation_error(model, data, conv_mode):.1e}"
    return rows, info


def _accumulation_error(model: nn.Module, data: list, conv_mode: str) -> float:
    small = [(x[:16], y[:16]) for x, y in data[:1]]
    low = factor_matrices(collect_kfac(model, small, conv_mode=conv_mode))
    exact = factor_matrices(collect_kfac(model, small, conv_mode=conv_mode, dtype=torch.float64))
    worst = 0.0
    for m, e in zip(low, exact, strict=True):
        scale = float(torch.linalg.eigvalsh(e).max().clamp_min(1e-300))
        worst = max(worst, float((m.double() - e).abs().max()) / scale)
    return worst


# --------------------------------------------------------------------------- prune step


def bench_prune_step(
    key: str = "vgg19-cifar",
    *,
    batches: int = 20,
    batch_sizes: Sequence[int] = (128,),
    ratio: float = 0.5,
    device: str = "cpu",
) -> list[dict]:
    """One EigenDamage round (K-FAC on ``batches`` batches, eigh, scoring, surgery) with the
    per-stage seconds that :func:`eigendamage.pruner.run_pruning` records."""
    from ..pruner import run_pruning

    rows = []
    for bs in batch_sizes:
        model, w = build(key, device, batch_size=bs)
        data = synthetic_batches(w, batches, device)
        result = run_pruning(
            model,
            data,
            method="eigendamage",
            ratio=ratio,
            fisher_batches=batches,
            input_shape=(1, *w.input_shape),
            device=device,
        )
        sec = result.rounds[0].seconds
        other = sec["prune"] - sum(v for k, v in sec.items() if k != "prune")
        rows.append(
            {
                "workload": key,
                "batch": bs,
                "batches": batches,
                **{f"{k} s": f"{v:.1f}" for k, v in sec.items() if k != "prune"},
                "other s": f"{other:.1f}",
                "total s": f"{sec['prune']:.1f}",
                "params kept": f"{result.params_kept:.2f}",
                "load avg": load_now(),
                "under 60 s": "yes" if sec["prune"] < 60 else "no",
            }
        )
    return rows


if __name__ == "__main__":  # fresh-process memory probe: bench memory KEY VARIANT BATCHES DEV
    if len(sys.argv) == 6 and sys.argv[1] == "memory":
        _memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit("usage: python -m eigendamage.curvature.bench memory KEY VARIANT BATCHES DEVICE")
