"""Tables and plots of the Fashion-MNIST protocol (benchmarks/fmnist_protocol.py): mean ± std
over the seeds that finished, for every (model, mode, FLOPs kept, method).

    python benchmarks/fmnist_report.py --config benchmarks/configs/fmnist_cpu.json

Writes ``docs/results-fashion-mnist/tables.md`` (``--out``) and one plot per (model, mode):
accuracy after fine-tuning against the FLOPs kept, with error bars.  Cells still missing
are counted in each row (``n``), so a partial run is never mistaken for a complete one.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eigendamage.io import atomic_write_text
from fmnist_protocol import ROOT, cell_path, cells, load_protocol

VARIANTS: set[str] = set()  # the config's ablation variants: their own table, not the main ones

COLUMNS = (
    ("pruned", "after pruning + BN recal."),
    ("finetune_1", "after 1 epoch"),
    ("finetune_n", "after N epochs"),
)


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def collect(cfg: dict[str, Any]) -> tuple[dict[tuple, list[dict]], dict[tuple, int]]:
    """Finished records grouped by (model, mode, kept, method), and how many seeds each
    group should have."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    expected: dict[tuple, int] = defaultdict(int)
    retimed = _retimed(cfg)
    for key in cells(cfg):
        group = (key[0], key[2], key[3], key[4])
        expected[group] += 1
        path = cell_path(cfg, *key)
        if not path.is_file():
            continue
        record = json.loads(path.read_text(encoding="utf-8"))
        timed = retimed["cells"].get(str(path.relative_to(cfg["out"])))
        if timed is not None:  # the latency pass: every model timed in one sitting
            record["latency_ms"] = timed
        if "error" not in record:  # sizes as fractions of the cell's own unpruned model
            base = _base(cfg, key[0], key[1])
            record["flops_kept"] = record["flops"] / base["flops"]
            record["params_kept"] = record["params"] / base["params"]
        groups[group].append(record)
    return groups, expected


def _retimed(cfg: dict[str, Any]) -> dict[str, Any]:
    """``latency.json`` of ``fmnist_protocol.py latency`` (empty when it has not run)."""
    path = Path(cfg["out"]) / "latency.json"
    if not path.is_file():
        return {"cells": {}, "originals": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def _base(cfg: dict[str, Any], model: str, seed: int) -> dict[str, Any]:
    path = Path(cfg["out"]) / "pretrained" / f"{model}_s{seed}" / "metrics.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    timed = _retimed(cfg)["originals"].get(f"{model}_s{seed}")
    return {**record, "latency_ms": timed} if timed is not None else record


def base_rows(cfg: dict[str, Any]) -> list[str]:
    """The unpruned models: accuracy, size and latency per model (mean over seeds)."""
    lines = ["| model | seeds | test acc % | params | FLOPs | latency b1 / b64 (ms) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name in cfg["models"]:
        folder = Path(cfg["out"]) / "pretrained"
        done = [s for s in cfg["seeds"] if (folder / f"{name}_s{s}" / "metrics.json").is_file()]
        recs = [_base(cfg, name, s) for s in done]
        if not recs:
            continue
        b1 = statistics.fmean(r["latency_ms"]["b1"] for r in recs)
        b64 = statistics.fmean(r["latency_ms"]["b64"] for r in recs)
        lines.append(
            f"| {name} | {len(recs)} | {_mean_std([r['test_acc'] for r in recs])} | "
            f"{recs[0]['params']:,} | {recs[0]['flops']:,} | {b1:.2f} / {b64:.1f} |"
        )
    return lines


def ablation(cfg: dict[str, Any], groups: dict[tuple, list[dict]], expected: dict[tuple, int]):
    """The ablation's variants beside the method they vary on the same seeds, per budget
    (mean ± std)."""
    variants = cfg.get("variants", {})
    lines = ["| model | FLOPs kept | variant | n | after pruning + BN recal. | after N epochs | "
             "params kept % |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for (m, md, kept, name), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][2])):
        if name not in variants:
            continue
        base = variants[name]["method"]
        seeds = {r["seed"] for r in recs}  # the base on the variant's seeds only: paired
        base_rows = [r for r in groups.get((m, md, kept, base), []) if r["seed"] in seeds]
        for label, rows, n in ((f"{base} (as in the main table)", base_rows, len(seeds)),
                               (name, recs, expected[(m, md, kept, name)])):  # fmt: skip
            ok = [r for r in rows if "error" not in r]
            lines.append(
                f"| {m} | {kept:g} | {label} | {len(ok)}/{n} | "
                f"{_mean_std([r['pruned']['test_acc'] for r in ok])} | "
                f"{_mean_std([r['finetune_n']['test_acc'] for r in ok if r.get('finetune_n')])} | "
                f"{_mean_std([r['params_kept'] for r in ok])} |"
            )
    # Each base row is repeated per variant: keep its first occurrence per budget only.
    seen: set[str] = set()
    return [ln for ln in lines if not (ln in seen or seen.add(ln))]


def table(groups: dict[tuple, list[dict]], expected: dict[tuple, int], model: str, mode: str):
    head = " | ".join(label for _, label in COLUMNS)
    lines = [
        f"| FLOPs kept | method | n | {head} | FLOPs kept (real) % | params kept % | "
        "b1 / b64 ms | ΔL predicted / measured (after BN recal.) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (m, md, kept, method), recs in sorted(groups.items(), key=lambda kv: (-kv[0][2],)):
        if (m, md) != (model, mode) or method in VARIANTS:
            continue
        ok = [r for r in recs if "error" not in r]
        if not ok:
            lines.append(f"| {kept:g} | {method} | 0/{expected[(m, md, kept, method)]} | "
                         f"error: {recs[0]['error'][:80]} |||||||")  # fmt: skip
            continue
        accs = [_mean_std([r[st]["test_acc"] for r in ok if r.get(st)]) for st, _ in COLUMNS]
        real = _mean_std([r["flops_kept"] for r in ok])
        params = _mean_std([r["params_kept"] for r in ok])
        b1 = statistics.fmean(r["latency_ms"]["b1"] for r in ok)
        b64 = statistics.fmean(r["latency_ms"]["b64"] for r in ok)
        dl = _delta_loss(ok) if mode == "one-pass" else "–"  # rounds + tuning in between
        n = f"{len(ok)}/{expected[(m, md, kept, method)]}"
        lines.append(f"| {kept:g} | {method} | {n} | {' | '.join(accs)} | {real} | {params} | "
                     f"{b1:.2f} / {b64:.1f} | {dl} |")  # fmt: skip
    return lines


def _paired(ed: list[dict], other: list[dict], stage: str) -> list[float]:
    """Per-seed accuracy differences (points), EigenDamage minus ``other``, over the seeds
    both finished: the same trained model and batches, so the seed noise cancels."""
    mine = {r["seed"]: r[stage]["test_acc"] for r in ed if r.get(stage)}
    return [100 * (mine[r["seed"]] - r[stage]["test_acc"])
            for r in other if r.get(stage) and r["seed"] in mine]  # fmt: skip


def verdict(diffs: list[float]) -> str:
    """Ahead / behind when every seed's difference has the same sign and the mean is at
    least half a point; level otherwise (the rule the reading uses)."""
    if not diffs:
        return "–"
    mean = statistics.fmean(diffs)
    if all(d > 0 for d in diffs) and mean >= 0.5:
        return "ahead"
    if all(d < 0 for d in diffs) and mean <= -0.5:
        return "behind"
    return "level"


def verdicts(groups: dict[tuple, list[dict]], model: str, mode: str, stage: str) -> list[str]:
    """EigenDamage against every other method, per budget: the paired difference at
    ``stage`` (mean ± std over common seeds) and its verdict; Torch-Pruning's best marked."""
    lines = ["| FLOPs kept | seeds | ahead of | level with | behind | best Torch-Pruning |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for kept in sorted({g[2] for g in groups if g[:2] == (model, mode)}, reverse=True):
        ed = [r for r in groups.get((model, mode, kept, "eigendamage"), []) if "error" not in r]
        if not ed:
            continue
        sides: dict[str, list[str]] = {"ahead": [], "level": [], "behind": []}
        best_tp: tuple[float, str] | None = None
        for (m, md, k, name), recs in sorted(groups.items()):
            if (m, md, k) != (model, mode, kept) or name == "eigendamage" or name in VARIANTS:
                continue
            diffs = _paired(ed, [r for r in recs if "error" not in r], stage)
            if not diffs:
                continue
            side = verdict(diffs)
            sides[side].append(f"{name} {_signed(diffs)} ({len(diffs)})")
            theirs = [r[stage]["test_acc"] for r in recs if r.get(stage)]
            if name.startswith("tp-") and (
                best_tp is None or statistics.fmean(theirs) > best_tp[0]
            ):
                best_tp = (statistics.fmean(theirs), f"{name}: {side}")
        lines.append(f"| {kept:g} | {len(ed)} | {', '.join(sides['ahead']) or '–'} | "
                     f"{', '.join(sides['level']) or '–'} | {', '.join(sides['behind']) or '–'} | "
                     f"{best_tp[1] if best_tp else '–'} |")  # fmt: skip
    return lines


def _signed(diffs: list[float]) -> str:
    mean = statistics.fmean(diffs)
    return f"{mean:+.1f}" + (f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else "")


def _delta_loss(records: list[dict]) -> str:
    """Predicted / measured loss increase (measured before / after BN recalibration)."""

    def mean(key: str) -> str:
        values = [v for r in records if (v := r["delta_loss"].get(key)) is not None]
        return f"{statistics.fmean(values):.3f}" if values else "–"

    return f"{mean('predicted')} / {mean('measured')} ({mean('measured_after_bn_recal')})"


@dataclass(frozen=True)
class Panel:
    """One panel of a two-panel figure: which accuracy, and where a group's point sits."""

    stage: str  # "pruned" or "finetune_n"
    x: Callable[[float, list[dict]], float]  # (budget, the group's records) -> x position
    xlabel: str
    title: str
    log_x: bool = True


def _draw(groups: dict[tuple, list[dict]], model: str, mode: str, path: Path,
          panels: tuple[Panel, Panel], ylabel: str) -> None:  # fmt: skip
    """Accuracy (mean over seeds, their standard deviation as error bars), one line per
    method, EigenDamage in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    methods = sorted({g[3] for g in groups if g[:2] == (model, mode) and g[3] not in VARIANTS})
    colors = plt.get_cmap("tab20")(range(20))
    for ax, panel in zip(axes, panels, strict=True):
        for i, method in enumerate(methods):
            points = []
            for (m, md, kept, name), recs in groups.items():
                ok = [r for r in recs if r.get(panel.stage)]
                if (m, md, name) != (model, mode, method) or not ok:
                    continue
                accs = [r[panel.stage]["test_acc"] * 100 for r in ok]
                spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
                points.append((panel.x(kept, ok), statistics.fmean(accs), spread))
            if not points:
                continue
            points.sort()
            bold = method == "eigendamage"
            ax.errorbar(
                [p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                capsize=2, label=method, color="black" if bold else colors[i % 20],
                lw=2.5 if bold else 1, marker="os^vD<>ph*"[i % 10], ms=4,
            )  # fmt: skip
        if panel.log_x:
            ax.set_xscale("log")
        ax.set_xlabel(panel.xlabel)
        ax.set_title(f"{model}, {mode}: {panel.title}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _budget(kept: float, _: list[dict]) -> float:
    return kept


def plot(groups: dict[tuple, list[dict]], model: str, mode: str, path: Path) -> None:
    """Two panels against FLOPs kept: right after pruning (BN recalibrated) and after
    fine-tuning."""
    panels = tuple(Panel(stage, _budget, "FLOPs kept (target)", label)
                   for stage, label in (COLUMNS[0], COLUMNS[2]))  # fmt: skip
    _draw(groups, model, mode, path, panels, "test accuracy (%)")


def widths(
    cfg: dict[str, Any], groups: dict[tuple, list[dict]], model: str, kept: float
) -> list[str]:
    """Channels (EigenDamage: S-basis directions of the core) each method keeps per conv,
    one-pass, first seed: where a criterion spends its budget, read off the recorded
    pruned architectures (modules absent from one kept their width)."""
    import torch

    from eigendamage.models import create_model

    base = create_model(model, num_classes=10, in_channels=1, **cfg["models"][model])
    convs = [(n, m.out_channels) for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d)]
    seed = cfg["seeds"][0]
    lines = [f"| method | kept of {' '.join(str(w) for _, w in convs)} |", "|---|---|"]
    for (m, md, k, name), recs in sorted(groups.items()):
        rec = next((r for r in recs if r["seed"] == seed and "architecture" in r), None)
        if (m, md, k) != (model, "one-pass", kept) or name in VARIANTS or rec is None:
            continue
        modules = rec["architecture"]["modules"]
        kept_widths = []
        for conv, width in convs:
            spec = modules.get(conv, {"type": "unchanged"})
            if spec["type"] == "KFEBottleneck":
                width = spec["children"]["core"]["args"]["out_channels"]
            elif spec["type"] == "Conv2d":
                width = spec["args"]["out_channels"]
            kept_widths.append(str(width))
        lines.append(f"| {name} | {' '.join(kept_widths)} |")
    return lines


def _ft_label(cfg: dict[str, Any], mode: str) -> str:
    settings = cfg["iterative"] if mode == "iterative" else cfg["one_pass"]
    return f"{settings['finetune']['epochs']} fine-tuning epochs"


def cost_plot(groups: dict[tuple, list[dict]], model: str, mode: str, path: Path) -> None:
    """Accuracy after fine-tuning against what a user pays: params kept and measured
    batch-64 latency (one thread), one point per (method, budget)."""
    panels = (
        Panel("finetune_n", lambda _, ok: statistics.fmean(r["params_kept"] for r in ok),
              "params kept (fraction, log)", "accuracy against parameters"),
        Panel("finetune_n", lambda _, ok: statistics.fmean(r["latency_ms"]["b64"] for r in ok),
              "latency at batch 64, one thread (ms)", "accuracy against measured latency",
              log_x=False),
    )  # fmt: skip
    _draw(groups, model, mode, path, panels, "test accuracy after fine-tuning (%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "benchmarks/configs/fmnist_cpu.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results-fashion-mnist")
    args = parser.parse_args()
    cfg = load_protocol(args.config)
    VARIANTS.update(cfg.get("variants", {}))
    groups, expected = collect(cfg)
    done = sum(len(v) for v in groups.values())
    lines = [f"Generated by `python benchmarks/fmnist_report.py --config {args.config.name}` "
             f"from {done} of {sum(expected.values())} cells.", "", "## Unpruned models", "",
             *base_rows(cfg)]  # fmt: skip
    for model in cfg["models"]:
        for mode in cfg["modes"]:
            rows = table(groups, expected, model, mode)
            if len(rows) == 2:
                continue
            image = f"{model}_{mode}.png"
            plot(groups, model, mode, args.out / image)
            cost = f"{model}_{mode}_cost.png"
            cost_plot(groups, model, mode, args.out / cost)
            lines += ["", f"## {model}, {mode}", "", f"![{model} {mode}]({image})", "", *rows,
                      "", "EigenDamage against each method: paired per-seed difference in "
                      "points (mean ± std, seeds); ahead/behind when every seed agrees in sign "
                      "and the mean is at least 0.5.", "",
                      "Right after pruning (BN recalibrated, no weight update):", "",
                      *verdicts(groups, model, mode, "pruned"), "",
                      f"After {_ft_label(cfg, mode)}:", "",
                      *verdicts(groups, model, mode, "finetune_n"), "",
                      f"![{model} {mode}, cost]({cost})"]  # fmt: skip
    for model in cfg["models"]:
        rows = widths(cfg, groups, model, 0.15)
        if len(rows) > 2:
            lines += ["", f"## Where each method spends the budget: {model}, one-pass, FLOPs "
                      f"kept 0.15, seed {cfg['seeds'][0]}", "", *rows]  # fmt: skip
    if VARIANTS:
        lines += ["", "## Ablation: what changes EigenDamage's accuracy", "",
                  *ablation(cfg, groups, expected)]  # fmt: skip
    timed = _retimed(cfg)
    repeats = timed.get("repeats", 20)
    lines += ["", f"Latency: {len(timed['cells'])} cells and {len(timed['originals'])} originals "
              "re-timed in one sitting by `fmnist_protocol.py latency` (one thread, median of "
              f"{repeats}); the others as measured inside their cell."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out / "tables.md", text)
    print(text)


if __name__ == "__main__":
    main()
