"""The paper's protocol on Fashion-MNIST: every method, one-pass and iterative, several seeds.

One cell = (model, seed, mode, FLOPs kept, method).  Each cell starts from the same trained
model of its (model, seed), prunes it to the budget and records, on the full test set:

* accuracy and loss right after pruning, with BatchNorm statistics recalibrated on training
  batches and no weight update (the criterion's own quality, apart from fine-tuning);
* the same after 1 and after N fine-tuning epochs;
* params, FLOPs and measured latency (batch 1 and 64, one thread);
* the loss increase the criterion predicted (sum of removed ΔL, where it reports one)
  against the one measured on a fixed held-out training batch (eval mode), before and
  after BatchNorm recalibration.

Resumable: each trained model and each cell is written atomically when done and skipped on
the next start; a killed pre-training resumes from its last epoch.  Each cell records its
pruned architecture; ``latency`` re-times them all in one sitting (run that alone)::

    python benchmarks/fmnist_protocol.py run --config benchmarks/configs/fmnist_cpu.json
    python benchmarks/fmnist_protocol.py latency --config benchmarks/configs/fmnist_cpu.json
    python benchmarks/fmnist_report.py --config benchmarks/configs/fmnist_cpu.json

The config (saved beside the results) names models, widths, seeds, methods, budgets,
epochs and the training subset; ``benchmarks/configs/fmnist_gpu.json`` is the full-width run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from eigendamage.data import make_loaders
from eigendamage.errors import EigenDamageError
from eigendamage.io import (
    atomic_write_json,
    build_architecture,
    describe_architecture,
    is_model_dir,
    load_model,
    save_model,
)
from eigendamage.measure import count, measure_latency
from eigendamage.methods import run_pruning
from eigendamage.models import create_model
from eigendamage.seeding import seed_everything
from eigendamage.train import evaluate, recalibrate_bn, reseed_loader, train

ROOT = Path(__file__).resolve().parents[1]
#: The commit whose code ran a cell (cells from different code are not mixed silently).
CODE = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
).stdout.strip()


def load_protocol(path: Path) -> dict[str, Any]:
    """The protocol config; ``out`` is resolved against the repository root."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["out"] = str((ROOT / cfg["out"]).resolve())
    return cfg


def cells(cfg: dict[str, Any]) -> Iterator[tuple[str, int, str, float, str]]:
    """Every cell, seed by seed: after the first seed all methods have a first result.
    The ablation's variants follow the main cells of their (seed, model, mode), on the
    ablation's ``seeds`` (default: the first seed).  ``later_seeds`` (model -> mode ->
    methods) narrows the seeds after the first to the methods whose spread the reading
    needs: the CPU budget."""
    ablation = cfg.get("ablation", {})
    for seed in cfg["seeds"]:
        first = seed == cfg["seeds"][0]
        for model in cfg["models"]:
            for mode in cfg["modes"]:
                default = cfg["methods"] if mode == "one-pass" else cfg["iterative"]["methods"]
                methods = cfg.get("methods_by_model", {}).get(model, {}).get(mode, default)
                if not first and "later_seeds" in cfg:
                    methods = cfg["later_seeds"].get(model, {}).get(mode, [])
                for kept in cfg["flops_kept"]:
                    for method in methods:
                        yield model, seed, mode, kept, method
                in_ablation = model in ablation.get("models", ()) and mode in ablation.get(
                    "modes", ()
                )
                if in_ablation and seed in ablation.get("seeds", cfg["seeds"][:1]):
                    for kept in ablation["flops_kept"]:
                        for variant in ablation["variants"]:
                            yield model, seed, mode, kept, variant


def resolve(cfg: dict[str, Any], name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(method, run_pruning overrides, fine-tuning overrides)`` of a method or variant name.

    ``X+norm`` is method X with per-layer score normalisation; the config's ``variants``
    map a name to ``{"method": ..., "prune": {...}, "finetune": {...}}`` (the ablation).
    """
    variant = cfg.get("variants", {}).get(name)
    if variant is not None:
        return variant["method"], dict(variant.get("prune", {})), dict(variant.get("finetune", {}))
    if name.endswith("+norm"):
        return name.removesuffix("+norm"), {"normalize": True}, {}
    return name, {}, {}


def cell_path(cfg: dict[str, Any], model: str, seed: int, mode: str, kept: float, method: str):
    return Path(cfg["out"]) / "cells" / model / f"s{seed}" / mode / f"f{kept:g}" / f"{method}.json"


class Data:
    """Loaders of one seed: a seeded training subset and a fixed test subset (the CPU
    budget; the same test images for every seed, so seeds differ only in training)."""

    def __init__(self, cfg: dict[str, Any], seed: int) -> None:
        loaders = make_loaders(
            cfg["dataset"], cfg.get("data_root"), batch_size=cfg["batch_size"], seed=seed
        )
        train_set = loaders.train.dataset
        n = min(cfg.get("train_subset") or len(train_set), len(train_set))
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
        subset = Subset(train_set, order[:n].tolist())
        g = torch.Generator().manual_seed(seed)
        self.train = DataLoader(subset, batch_size=cfg["batch_size"], shuffle=True, generator=g)
        test_set = loaders.test.dataset
        m = min(cfg.get("test_subset") or len(test_set), len(test_set))
        keep = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(0))[:m]
        self.test = DataLoader(Subset(test_set, keep.tolist()), batch_size=256)
        self.spec = loaders.spec
        # Fixed training batches, no augmentation draw in between: the measured ΔL.
        self.probe = [next(iter(loaders.val))]


def _epochs(model: torch.nn.Module, data: Data, ft: dict[str, Any], seed: int, on_epoch=None):
    train(  # on the model's device
        model,
        data.train,
        epochs=ft["epochs"],
        lr=ft["lr"],
        schedule=ft.get("schedule", "cosine"),
        weight_decay=ft.get("weight_decay", 5e-4),
        seed=seed,
        device=None,
        progress=False,
        log=on_epoch,
    )


def pretrained(cfg: dict[str, Any], name: str, seed: int, data: Data) -> torch.nn.Module:
    """The trained model of (model, seed): loaded, or trained now (resumable per epoch)."""
    folder = Path(cfg["out"]) / "pretrained" / f"{name}_s{seed}"
    device = cfg.get("device", "cpu")
    if is_model_dir(str(folder / "model")):
        return load_model(folder / "model").to(device)
    seed_everything(seed)
    model = create_model(name, num_classes=data.spec.num_classes, seed=seed, **cfg["models"][name])
    model.to(device)
    pre = cfg["pretrain"]
    start = time.perf_counter()
    train(
        model,
        data.train,
        epochs=pre["epochs"],
        lr=pre["lr"],
        schedule=pre.get("schedule", "cosine"),
        weight_decay=pre.get("weight_decay", 5e-4),
        l1_bn=pre.get("l1_bn", 0.0),
        seed=seed,
        device=device,
        checkpoint_path=folder / "train_checkpoint.pt",
        progress=False,
    )
    result = evaluate(model, data.test)
    save_model(model.cpu(), folder / "model")
    model.to(device)
    atomic_write_json(
        folder / "metrics.json",
        {
            "test_acc": result.accuracy,
            "test_loss": result.loss,
            "seconds": time.perf_counter() - start,
            **_size(model, data),
        },
    )
    (folder / "train_checkpoint.pt").unlink(missing_ok=True)
    return model


def _size(model: torch.nn.Module, data: Data) -> dict[str, Any]:
    """Params, FLOPs and median latency (one thread on CPU) at batch 1 and 64."""
    shape = (1, *data.spec.input_shape)
    counts = count(model, shape)
    device = next(model.parameters()).device
    latency = {
        f"b{b}": measure_latency(
            model, shape, batch_size=b, device=device, threads=1, repeats=20
        ).median_ms
        for b in (1, 64)
    }
    return {
        "params": counts.params,
        "flops": counts.flops,
        "latency_ms": latency,
        "load_average": os.getloadavg()[0],  # the in-run latency is only as good as this
    }


def _probe_loss(model: torch.nn.Module, data: Data) -> float:
    return evaluate(model, data.probe).loss


def run_cell(cfg: dict[str, Any], base: torch.nn.Module, data: Data, key: tuple) -> dict:
    """Prune ``base`` for one cell and measure it before and after fine-tuning."""
    _, seed, mode, kept, name = key
    method, prune_overrides, ft_overrides = resolve(cfg, name)
    iterative = mode == "iterative"
    settings = cfg["iterative"] if iterative else cfg["one_pass"]
    ft = {**settings["finetune"], **ft_overrides}
    pruning = {
        "per_layer_cap": settings["per_layer_cap"],
        "fisher_batches": cfg["fisher_batches"],
        **prune_overrides,
    }
    loss_before = _probe_loss(base, data)
    seed_everything(seed)
    # Every cell of a (model, seed) draws the same curvature and BN batches, whatever ran
    # before it in this process: a cell is a function of its key alone, and methods compare
    # on the same data.
    reseed_loader(data.train, seed)

    def between_rounds(model: torch.nn.Module, r: int) -> None:
        reseed_loader(data.train, seed * 7919 + r)
        recalibrate_bn(model, data.train, batches=cfg["bn_batches"])
        _epochs(model, data, settings["between_rounds"], seed + r)

    start = time.perf_counter()
    result = run_pruning(
        base,
        data.train,
        method=method,
        target_flops=kept,
        rounds=settings["rounds"],
        seed=seed,
        device=next(base.parameters()).device,
        input_shape=(1, *data.spec.input_shape),
        finetune=between_rounds if iterative else None,
        log=lambda line: None,
        **pruning,
    )
    model, seconds = result.model, time.perf_counter() - start
    last = result.rounds[-1].detail if result.rounds else {}
    measured = _probe_loss(model, data) - loss_before
    recalibrate_bn(model, data.train, batches=cfg["bn_batches"])
    measured_recal = _probe_loss(model, data) - loss_before
    after = evaluate(model, data.test)
    record: dict[str, Any] = {
        "model": key[0], "seed": seed, "mode": mode, "flops_kept_target": kept, "method": name,
        "rounds": len(result.rounds), "prune_seconds": seconds, "code": CODE,
        "pruned": {"test_acc": after.accuracy, "test_loss": after.loss},
        "delta_loss": {"predicted": last.get("predicted_delta_loss"), "measured": measured,
                       "measured_after_bn_recal": measured_recal},
        "target_reached": last.get("target_reached"),
    }  # fmt: skip
    curve: list[dict[str, float]] = []

    def on_epoch(_: dict[str, Any]) -> None:
        ev = evaluate(model, data.test)
        curve.append({"test_acc": ev.accuracy, "test_loss": ev.loss})

    _epochs(model, data, ft, seed + 1000, on_epoch)
    record["finetune_1"] = curve[0] if curve else None
    record["finetune_n"] = curve[-1] if curve else None
    record["finetune_epochs"] = ft["epochs"]
    record.update(_size(model, data))
    record["architecture"] = describe_architecture(model)  # `latency` re-times it alone
    return record


def run(cfg: dict[str, Any], only: Callable[[tuple], bool] = lambda key: True) -> None:
    out = Path(cfg["out"])
    atomic_write_json(out / "protocol.json", cfg)
    torch.set_num_threads(cfg.get("threads", 2))
    data_of: dict[int, Data] = {}
    bases: dict[tuple[str, int], torch.nn.Module] = {}
    todo = [k for k in cells(cfg) if only(k) and not cell_path(cfg, *k).is_file()]
    print(f"{len(todo)} cells to run in {out}", flush=True)
    for i, key in enumerate(todo, 1):
        name, seed = key[0], key[1]
        data = data_of.setdefault(seed, Data(cfg, seed))
        if (name, seed) not in bases:
            bases[(name, seed)] = pretrained(cfg, name, seed, data)
        start = time.perf_counter()
        try:
            record = run_cell(cfg, bases[(name, seed)], data, key)
        except EigenDamageError as exc:  # a method that cannot reach the budget: say so
            record = {"model": name, "seed": seed, "mode": key[2], "method": key[4],
                      "flops_kept_target": key[3], "error": str(exc)}  # fmt: skip
        record["cell_seconds"] = time.perf_counter() - start
        atomic_write_json(cell_path(cfg, *key), record)
        acc = record.get("finetune_n", {}) or {}
        print(f"[{i}/{len(todo)}] {key}: {acc.get('test_acc', 'error')} "
              f"({record['cell_seconds']:.0f} s)", flush=True)  # fmt: skip


def _latency(arch: dict[str, Any], repeats: int) -> dict[str, float]:
    model = build_architecture(arch).eval()
    shape = (1, *arch["base"]["input_size"])
    return {
        f"b{b}": measure_latency(
            model, shape, batch_size=b, device="cpu", threads=1, repeats=repeats
        ).median_ms
        for b in (1, 64)
    }


def retime(cfg: dict[str, Any], only: Callable[[tuple], bool], repeats: int = 20) -> None:
    """Re-time every finished cell's pruned model (rebuilt from its recorded architecture,
    fresh weights) and every trained original in one sitting, one thread: latencies measured
    side by side under the same load, written to ``latency.json`` (resumable, every 10)."""
    out = Path(cfg["out"])
    path = out / "latency.json"
    done = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    timed: dict[str, Any] = done.get("cells", {})
    todo: list[tuple[str, dict[str, Any]]] = []
    for key in cells(cfg):
        cell = cell_path(cfg, *key)
        rel = str(cell.relative_to(out))
        if only(key) and rel not in timed and cell.is_file():
            record = json.loads(cell.read_text(encoding="utf-8"))
            if "architecture" in record:
                todo.append((rel, record["architecture"]))
    originals = sorted((out / "pretrained").glob("*/model"))
    print(f"{len(todo)} cells and {len(originals)} originals to time", flush=True)
    result = {"threads": 1, "repeats": repeats, "cells": timed, "originals": {}}
    for folder in originals:
        arch = json.loads((folder / "architecture.json").read_text(encoding="utf-8"))
        result["originals"][folder.parent.name] = _latency(arch, repeats)
    for i, (rel, arch) in enumerate(todo, 1):
        timed[rel] = _latency(arch, repeats)
        if i % 10 == 0 or i == len(todo):
            result["load_average"] = os.getloadavg()[0]
            atomic_write_json(path, result)
            print(f"[{i}/{len(todo)}] timed", flush=True)
    if not todo:
        atomic_write_json(path, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "list", "latency"])
    parser.add_argument("--config", type=Path, default=ROOT / "benchmarks/configs/fmnist_cpu.json")
    parser.add_argument("--seed", type=int, action="append", help="only these seeds")
    parser.add_argument("--method", action="append", help="only these methods")
    args = parser.parse_args()
    cfg = load_protocol(args.config)

    def only(key: tuple) -> bool:
        return (not args.seed or key[1] in args.seed) and (not args.method or key[4] in args.method)

    if args.command == "list":
        keys = [k for k in cells(cfg) if only(k)]
        done = sum(cell_path(cfg, *k).is_file() for k in keys)
        print(f"{done}/{len(keys)} cells done in {cfg['out']}")
        return
    if args.command == "latency":
        retime(cfg, only)
        return
    run(cfg, only)


if __name__ == "__main__":
    main()
