"""Peak memory of K-FAC collection against a plain forward+backward (``eigendamage bench
kfac --memory``): collection streams over batches, so its peak must not grow with them."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence

import torch

from ..curvature import collect_kfac
from .workloads import build, plain_step, synthetic_batches, workload


def peak_memory_mib(key: str, variant: str, batches: int, device: str = "cpu") -> float:
    """Peak memory of one pass, in MiB above what model and data already hold.

    CPU: in a fresh subprocess, the RSS high-water mark of the pass (reset before it via
    ``/proc/self/clear_refs``) minus the RSS before it (torch's CPU allocations are
    invisible to tracemalloc).  CUDA: ``max_memory_allocated`` delta.
    """
    if torch.device(device).type == "cuda":
        return _peak_cuda(key, variant, batches, device)
    cmd = [sys.executable, "-m", "eigendamage.benchmarking.memory", "memory", key, variant]
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


if __name__ == "__main__":  # fresh-process memory probe: bench memory KEY VARIANT BATCHES DEV
    if len(sys.argv) == 6 and sys.argv[1] == "memory":
        _memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(
            "usage: python -m eigendamage.benchmarking.memory memory KEY VARIANT BATCHES DEVICE"
        )
