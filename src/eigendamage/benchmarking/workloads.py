"""The benchmark protocol: workloads, synthetic inputs, interleaved timing, tables.

Every benchmark runs the variants it compares *side by side in one process*, interleaved
round by round (A, B, A, B, ...), and keeps the minimum over rounds: on a shared machine
the minimum is the run least disturbed by other processes, and interleaving exposes every
variant to the same background load.  Each report starts with the machine, torch version
and settings, so a table is never separated from how it was produced.

Inputs are synthetic (seeded Gaussian images, uniform labels): speed does not depend on
the pixel values, and no dataset download is needed.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, unknown_name
from ..models import create_model


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
