"""Hostile or careless command lines and config files (issue 12, item 10): every one is a
single ``error:`` line with exit code 2 (3 for a full disk), no traceback, nothing written;
plus a property-based fuzz of config files through the real CLI."""

from __future__ import annotations

import errno
import json
import math
import os
import resource
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from eigendamage import io, runner
from eigendamage.cli import main
from eigendamage.config import TrainConfig, build_config
from eigendamage.errors import ConfigError, EigenDamageError
from eigendamage.io import atomic

TRAIN = ["train", "--model", "digits-vgg", "--device", "cpu", "--no-progress"]
PRUNE = ["prune", "--model", "digits-vgg", "--method", "l1", "--ratio", "0.3", "--no-progress"]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _write_configs(tmp: Path) -> None:
    (tmp / "deep.json").write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (tmp / "deep.toml").write_text("model = " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp / "nested.json").write_text('{"model": ' + "[" * 100 + "]" * 100 + "}")
    (tmp / "bigint.json").write_text('{"model": "digits-vgg", "seed": ' + "9" * 5000 + "}")
    (tmp / "bigint.toml").write_text('model = "digits-vgg"\nseed = ' + "9" * 5000 + "\n")
    (tmp / "epochs.json").write_text(json.dumps({"model": "digits-vgg", "epochs": 10**23}))
    (tmp / "binary.json").write_bytes(b'{"model": "\xff\xfe"}')
    (tmp / "huge.json").write_text(json.dumps({"model": "digits-vgg", "pad": "x" * (2 << 20)}))


# (id, args, exit code, fragments of the one error line)
CASES: list[tuple[str, list[str], int, list[str]]] = [
    ("json-nested-100k", ["train", "--config", "deep.json"], 2, ["deep.json", "nested too deeply"]),
    ("toml-nested-5000", ["train", "--config", "deep.toml"], 2, ["deep.toml", "nested"]),
    ("json-nested-100", ["train", "--config", "nested.json"], 2, ["nested deeper than 32"]),
    ("json-int-5000-digits", ["train", "--config", "bigint.json"], 2, ["bigint.json", "4300"]),
    ("toml-int-5000-digits", ["train", "--config", "bigint.toml"], 2, ["bigint.toml", "4300"]),
    ("config-not-utf8", ["train", "--config", "binary.json"], 2, ["binary.json", "not UTF-8"]),
    ("config-too-big", ["train", "--config", "huge.json"], 2, ["huge.json", "too big"]),
    ("config-epochs-1e23", ["train", "--config", "epochs.json"], 2, ["epochs", "less than"]),
    ("epochs-1e300", [*TRAIN, "--epochs", "1e300"], 2, ["--epochs"]),
    ("epochs-huge-int", [*TRAIN, "--epochs", str(10**23)], 2, ["epochs", "less than"]),
    ("seed-1e23", [*TRAIN, "--seed", "1e23"], 2, ["--seed"]),
    ("seed-huge-int", [*TRAIN, "--epochs", "1", "--seed", str(10**23)], 2, ["seed", "less than"]),
    ("lr-1e308", [*TRAIN, "--epochs", "1", "--lr", "1e308"], 2, ["lr", "less than"]),
    ("finetune-lr-1e308", [*PRUNE, "--finetune-epochs", "1", "--finetune-lr", "1e308"], 2,
     ["finetune.lr", "less than"]),
    ("weight-decay-1e308", [*TRAIN, "--epochs", "1", "--weight-decay", "1e308"], 2,
     ["weight_decay", "less than"]),
    ("rounds-huge", [*PRUNE, "--rounds", str(10**9)], 2, ["rounds", "less than"]),
    ("device-meta", [*PRUNE, "--finetune-epochs", "0", "--device", "meta"], 2,
     ["device type 'meta' is not supported"]),
    ("device-meta-train", [*TRAIN[:-3], "--epochs", "1", "--device", "meta"], 2,
     ["device type 'meta' is not supported"]),
]  # fmt: skip
if not torch.backends.mps.is_available():
    CASES.append(
        (
            "device-mps-missing",
            [*PRUNE, "--finetune-epochs", "0", "--device", "mps"],
            2,
            ["'mps'", "no usable MPS", "--device cpu"],
        )  # fmt: skip
    )


@pytest.mark.parametrize(("args", "code", "fragments"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_hostile_options_and_configs_are_one_line_and_write_nothing(
    args: list[str],
    code: int,
    fragments: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _write_configs(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([*args, "--out", "o"]) == code
    line = _one_error_line(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no "o", nothing else


def test_bounds_hold_for_the_python_config_api_too() -> None:
    with pytest.raises(ConfigError, match="seed"):
        build_config(TrainConfig, None, {"model": "digits-vgg", "seed": 2**64})
    with pytest.raises(ConfigError, match="epochs"):
        build_config(TrainConfig, None, {"model": "digits-vgg", "epochs": 10**23})
    ok = build_config(TrainConfig, None, {"model": "digits-vgg", "seed": 2**32 - 1})
    assert ok.seed == 2**32 - 1


# --------------------------------------------------------------------------- full disk


def test_full_disk_while_saving_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills while epoch 2's checkpoint is written: exit 3, one line, and epoch 1's
    checkpoint is still the complete file it was (so --resume continues from it)."""
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "o" / runner.TRAIN_CHECKPOINT
    seen: dict[str, bytes] = {}
    real_write = io.atomic_write_bytes

    def filling_disk(path: Any, data: bytes) -> Path:
        if Path(path).resolve() == checkpoint and checkpoint.is_file():
            seen["before"] = checkpoint.read_bytes()
            tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.0badf00d.tmp")
            tmp.write_bytes(data[: len(data) // 2])  # a partial temp file, as a real write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        return real_write(path, data)

    monkeypatch.setattr(atomic, "atomic_write_bytes", filling_disk)
    assert main([*TRAIN, "--epochs", "3", "--out", "o"]) == 3
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "--resume" in line
    assert seen, "the second epoch's checkpoint was never written"
    assert checkpoint.read_bytes() == seen["before"]
    assert io.load_checkpoint(checkpoint)["epoch"] == 1
    monkeypatch.setattr(atomic, "atomic_write_bytes", real_write)
    assert main([*TRAIN[:1], "--resume", "o", "--no-progress"]) == 0
    assert (tmp_path / "o" / runner.METRICS_FILE).is_file()
    assert not list((tmp_path / "o").glob(".*.tmp"))  # the partial temp file was cleaned up


def test_full_disk_before_anything_is_saved_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    def full(path: Any, data: bytes) -> Path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(atomic, "atomic_write_bytes", full)
    assert main([*TRAIN, "--epochs", "1", "--out", "o"]) == 3
    assert "No space left on device" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- fuzz

FIELDS = [
    "model", "checkpoint", "dataset", "data_root", "method", "ratio", "target_params",
    "target_flops", "rounds", "per_layer_cap", "fisher", "fisher_batches", "fisher_samples",
    "damping", "finetune", "seed", "device", "batch_size", "allow_pickle",
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 2, -1, 10**30, 10**400])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["digits-vgg", "l1", "eigendamage", "cpu", "meta", "true", "../x", ""])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
VALID_BASE = {"model": "digits-vgg", "method": "l1", "ratio": 0.3, "finetune": {"epochs": 0}}


@st.composite
def configs(draw: st.DrawFn) -> Any:
    """Mostly a valid config with a few fields replaced, dropped or added; sometimes any
    JSON value at all (including deep nesting and non-objects)."""
    if draw(st.integers(0, 9)) == 0:
        depth = draw(st.integers(1, 3000))
        return json.loads("[" * depth + "]" * depth) if depth < 900 else depth
    data: dict[str, Any] = dict(VALID_BASE)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(FIELDS) | st.text(max_size=8))
        if draw(st.booleans()) and key in data:
            del data[key]
        else:
            data[key] = draw(VALUES)
    return data


class _ReachedTheRun(EigenDamageError):
    """Raised where pruning would start: the config was accepted and validated end to end."""


def _encode(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 900:
        return "[" * value + "]" * value  # deeper than json.dumps can write
    return json.dumps(value)  # NaN/Infinity are written as the JSON extension json reads


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(config=configs())
def test_fuzzed_config_files_give_a_run_or_one_error_line(
    config: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Whatever a config file holds: either the run starts (it is stopped where pruning
    would begin, which also exercises the clean-up of a failed new run) or one ``error:``
    line, exit 2; never a traceback, never files left behind, no big allocation."""
    work = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    work.mkdir()
    (work / "c.json").write_text(_encode(config))

    def stop(*args: Any, **kwargs: Any) -> None:
        raise _ReachedTheRun("stopped where pruning would start")

    monkeypatch.setattr(runner, "run_pruning", stop)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = main(["prune", "--config", str(work / "c.json"), "--out", str(work / "o")])
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    event("accepted" if "stopped where pruning would start" in line else "refused")
    assert not (work / "o").exists()
    assert (rss_after - rss_before) * 1024 < 512 * 2**20  # ru_maxrss is in KiB on Linux


def test_the_fuzz_strategy_reaches_valid_runs(tmp_path: Path) -> None:
    """Guard against a fuzz that only ever tests the parser: the valid base config runs."""
    (tmp_path / "c.json").write_text(json.dumps(VALID_BASE))
    cfg = build_config(runner.PruneConfig, tmp_path / "c.json", {})
    assert cfg.method == "l1" and math.isclose(cfg.ratio, 0.3)


def test_a_full_disk_under_safetensors_is_an_os_error_naming_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors reports I/O failures as its own exception type; a full disk must reach
    the CLI as ENOSPC (exit 3, one line), not as an unknown error with a traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    from eigendamage.models import create_model

    def full(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    with pytest.raises(OSError) as caught:
        io.save_model(create_model("tiny-mlp"), tmp_path / "m")
    assert caught.value.errno == errno.ENOSPC and str(tmp_path / "m") in str(caught.value)
    assert not list((tmp_path / "m").iterdir())  # no temp file left behind
