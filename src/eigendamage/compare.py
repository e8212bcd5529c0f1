"""Methods x budgets on one trained model: the paper's comparison as one resumable job.

Layout of the output directory::

    config.json                  the CompareConfig
    train.json, train/           the model trained first (TrainConfig, ``run_train``), if asked
    runs/<method>_<budget>/      one ``run_prune`` directory per run (metrics.json = done)
    results.csv, results.md      one row per run plus the unpruned reference
    acc_vs_params.png, acc_vs_flops.png

Each run is an ordinary prune run, so a finished one is skipped on resume and a crashed one
continues from its last round.  A method ``NAME+norm`` (or ``normalize`` on the whole
comparison) is channel criterion ``NAME`` with per-layer score normalisation, labelled so
in rows, run names and plots: both protocols share one table.  Weight-level obd/obs report
their non-zero parameters (see :mod:`.reported`).  A run that fails for a documented
reason (an unreachable budget, ...) is recorded with its message instead of stopping the
other runs.  Latency is measured for all models together at the end, so one machine state
times them all.  The directory is locked for the whole comparison: a second one on the
same ``--out`` is refused at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from .config import NORM_SUFFIX, CompareConfig, PruneConfig, TrainConfig, config_to_dict
from .errors import ConfigError, EigenDamageError, unknown_name
from .io import (
    atomic_write_json,
    load_model,
    load_model_file,
    lock_output_dir,
    prepare_output_dir,
)
from .measure import measure_latency
from .methods import available_methods, check_normalize
from .models import create_from_spec, default_input_shape
from .models.registry import SPEC_ATTR
from .report import REFERENCE, write_results
from .reported import NONZERO_NOTE, method_label, sparse_params
from .runner import MODEL_DIR, finished_metrics, run_prune, run_train
from .train.progress import Silent, TrainProgress

Log = Callable[[str], None]
RUNS_DIR = "runs"
TRAIN_DIR = "train"
TRAIN_CONFIG = "train.json"
LATENCY_THREADS = 1  # one thread: timings on a shared machine vary least
LATENCY_PASSES = 3  # interleaved passes over all models; the fastest median counts
_BUDGET_LABEL = {"ratio": "ratio", "target_params": "params", "target_flops": "flops"}


class CompareProgress(TrainProgress, Protocol):
    """What :func:`run_compare` reports as it goes: the training of the model first (as
    :class:`~eigendamage.train.TrainProgress`), then one step per run and one for latency.
    The CLI draws it (:mod:`eigendamage.cli.progress`); the library prints nothing."""

    def start_runs(self, total: int, log: Log) -> Log:
        """``total`` steps begin; returns the log to use until :meth:`stop_runs` (a live
        display prints log lines above itself)."""

    def show_run(self, what: str) -> None:
        """The step now running."""

    def run_done(self) -> None:
        """A step ended."""

    def stop_runs(self) -> None:
        """The steps ended, finished or not."""


class _SilentRuns(Silent):
    """The default: progress goes nowhere."""

    def start_runs(self, total: int, log: Log) -> Log:
        return log

    def show_run(self, what: str) -> None:
        pass

    def run_done(self) -> None:
        pass

    def stop_runs(self) -> None:
        pass


@dataclass
class RunRecord:
    """One (method, budget) run: its settings and its metrics, or why it failed."""

    name: str
    run_dir: Path
    config: PruneConfig
    metrics: dict[str, Any] | None = None
    error: str | None = None
    skipped: bool = False

    @property
    def budget(self) -> tuple[str, float]:
        field = next(f for f in _BUDGET_LABEL if getattr(self.config, f) is not None)
        return field, getattr(self.config, field)


def run_name(cfg: PruneConfig) -> str:
    """Directory name of a run, e.g. ``eigendamage_flops0.5``."""
    field = next(f for f in _BUDGET_LABEL if getattr(cfg, f) is not None)
    return f"{method_label(cfg)}_{_BUDGET_LABEL[field]}{getattr(cfg, field):g}"


def _check_methods(cfg: CompareConfig) -> None:
    """Known methods, ``+norm`` only on channel criteria, and no run listed twice."""
    known = available_methods()
    for name in cfg.methods:
        method = name.removesuffix(NORM_SUFFIX)
        if method not in known:
            raise ConfigError(unknown_name("method", name, known))
        check_normalize(method, name != method)
    names = [run_name(run) for run in cfg.runs()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"runs {', '.join(dupes)} are listed twice (normalize=true already adds +norm "
            "to every channel criterion)"
        )


def run_compare(
    cfg: CompareConfig,
    out: str | Path,
    *,
    train: TrainConfig | None = None,
    force: bool = False,
    resume: bool = False,
    allow_pickle: bool = False,
    log: Log = print,
    progress: CompareProgress | None = None,
) -> list[dict[str, Any]]:
    """Prune ``cfg``'s model with every method at every budget; returns the result rows.

    ``train`` trains a model first (into ``OUT/train``; ``OUT/train.json`` keeps its
    config for resuming) and prunes that checkpoint instead of ``cfg.model``/``checkpoint``.
    ``allow_pickle`` lets a legacy ``torch.save`` checkpoint load (see ``run_prune``).
    ``progress`` follows the training and the runs (default: nothing is shown).
    """
    if train is None and cfg.checkpoint is None:
        raise ConfigError(
            f"compare needs a trained model: give a checkpoint, or train {cfg.model} first "
            "(--train-epochs N)"
        )
    _check_methods(cfg)
    out_dir = prepare_output_dir(out, force=force, resume=resume)
    with lock_output_dir(out_dir):
        return _compare(cfg, out_dir, train, force, resume, allow_pickle, log, progress)


def _compare(
    cfg: CompareConfig,
    out_dir: Path,
    train: TrainConfig | None,
    force: bool,
    resume: bool,
    allow_pickle: bool,
    log: Log,
    progress: CompareProgress | None,
) -> list[dict[str, Any]]:
    atomic_write_json(out_dir / "config.json", config_to_dict(cfg))
    if train is not None:
        atomic_write_json(out_dir / TRAIN_CONFIG, config_to_dict(train))
        run_train(
            train, out_dir / TRAIN_DIR, force=force, resume=resume, log=log, progress=progress
        )
        fields = cfg.model_dump(exclude={"model", "checkpoint"})
        cfg = CompareConfig(**fields, checkpoint=str(out_dir / TRAIN_DIR / MODEL_DIR))
    records = []
    runs = cfg.runs()
    bar = progress or _SilentRuns()
    say = bar.start_runs(len(runs) + 1, log)
    try:
        for run_cfg in runs:
            name = run_name(run_cfg)
            bar.show_run(name)
            run_dir = out_dir / RUNS_DIR / name
            record = _run_one(run_cfg, name, run_dir, force, resume, allow_pickle, say)
            records.append(record)
            say(f"{name}: {'finished before' if record.skipped else record.error or 'done'}")
            bar.run_done()
        bar.show_run("measuring latency")
        rows = result_rows(_reference_model(cfg, records, allow_pickle), records)
        bar.run_done()
    finally:
        bar.stop_runs()
    write_results(
        rows,
        out_dir,
        title=f"{train.model if train else cfg.model or cfg.checkpoint} on {cfg.dataset}",
    )
    log(f"results: {out_dir / 'results.md'}")
    return rows


def _run_one(
    cfg: PruneConfig,
    name: str,
    run_dir: Path,
    force: bool,
    resume: bool,
    allow_pickle: bool,
    log: Log,
) -> RunRecord:
    if resume and (done := finished_metrics(run_dir)) is not None:
        return RunRecord(name, run_dir, cfg, done, skipped=True)
    try:
        metrics = run_prune(
            cfg, run_dir, force=force, resume=resume, allow_pickle=allow_pickle, log=log
        )
    except EigenDamageError as exc:
        return RunRecord(name, run_dir, cfg, error=str(exc))
    return RunRecord(name, run_dir, cfg, metrics)


def _reference_model(
    cfg: CompareConfig, records: list[RunRecord], allow_pickle: bool
) -> nn.Module | None:
    """The unpruned model, loaded as the runs load it.  A state_dict checkpoint gets its
    architecture from a pruned model's spec (sized for the dataset); without any finished
    run there is none, and the reference row has no latency."""
    build = None
    if cfg.model is not None:
        done = [r for r in records if r.metrics is not None]
        if not done:
            return None
        spec = getattr(load_model(done[0].run_dir / MODEL_DIR), SPEC_ATTR)
        build = partial(create_from_spec, spec)
    return load_model_file(cfg.checkpoint, allow_pickle=allow_pickle, build=build)


def latencies(models: dict[str, Callable[[], nn.Module]]) -> dict[str, float]:
    """Median CPU latency (ms, batch 1) of each model, taken as the best of
    ``LATENCY_PASSES`` interleaved passes: a burst of load from other processes then slows
    one pass of every model instead of all passes of some, and the best pass shows it least.
    ``models`` maps names to loaders, so only one model is in memory at a time."""
    best: dict[str, float] = {}
    for _ in range(LATENCY_PASSES):
        for name, load in models.items():
            model = load()
            shape = default_input_shape(model)
            median = measure_latency(
                model, shape, batch_size=1, device="cpu", threads=LATENCY_THREADS
            ).median_ms
            best[name] = min(best.get(name, median), median)
    return best


def result_rows(reference: nn.Module | None, records: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per run plus the unpruned reference (method ``original``) first.

    Accuracy is a fraction; ``*_removed_pct`` are percentages of the reference; latency is
    the CPU forward time at batch 1 (see :func:`latencies`), ``speedup`` the reference's
    latency over the run's; ``last_round_ratio`` is the fraction of the method's units
    (eigen-directions, channels or weights) its last round removed, i.e. what a
    params/FLOPs budget translated to.
    """
    done = {r.name: r.run_dir / MODEL_DIR for r in records if r.metrics is not None}
    loaders = {n: partial(load_model, p) for n, p in done.items()}
    if reference is not None:
        loaders[REFERENCE] = lambda: reference
    timed = latencies(loaders)
    base_latency = timed.get(REFERENCE)
    before = next((r.metrics["before"] for r in records if r.metrics), {})
    rows: list[dict[str, Any]] = [
        {
            "method": REFERENCE,
            "budget": "-",
            "status": "reference",
            "test_acc": before.get("test_acc"),
            "val_acc": before.get("val_acc"),
            "test_acc_change": 0.0,
            "params": before.get("params"),
            "flops": before.get("flops"),
            "params_removed_pct": 0.0,
            "flops_removed_pct": 0.0,
            "latency_ms": base_latency,
            "speedup": 1.0,
        }
    ]
    for record in records:
        field, value = record.budget
        row: dict[str, Any] = {
            "method": method_label(record.config),
            "budget": f"{_BUDGET_LABEL[field]} {value:g}",
            "rounds": record.config.rounds,
            "run": record.name,
        }
        m = record.metrics
        if m is None:
            rows.append({**row, "status": "failed", "error": record.error})
            continue
        m = sparse_params(m)
        latency = timed[record.name]
        rows.append(
            {
                **row,
                "status": "ok",
                "test_acc": m["after"]["test_acc"],
                "val_acc": m["after"]["val_acc"],
                "test_acc_change": m["test_acc_change"],
                "params": m["after"]["params"],
                "flops": m["after"]["flops"],
                "params_removed_pct": 100 * m["params_removed"],
                "flops_removed_pct": 100 * m["flops_removed"],
                "latency_ms": latency,
                "speedup": base_latency / latency if base_latency else None,
                "last_round_ratio": m["rounds"][-1]["ratio"] if m["rounds"] else None,
                "prune_s": m["seconds"].get("prune"),
                "finetune_s": m["seconds"].get("finetune"),
                **({"note": NONZERO_NOTE} if "params_dense" in m["after"] else {}),
            }
        )
    return rows
