"""Training loop, schedules, slimming penalty, evaluation, BN recalibration, exact resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from eigendamage.cli.progress import Bars
from eigendamage.errors import ConfigError, DataError, EigenDamageError
from eigendamage.io import CheckpointError, load_checkpoint
from eigendamage.train import (
    EvalResult,
    TrainHistory,
    TrainingError,
    evaluate,
    lr_at,
    recalibrate_bn,
    train,
)


def _data(n: int = 256, seed: int = 0) -> TensorDataset:
    """Two Gaussian blobs in 8 dims: linearly separable, so a few epochs suffice."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 8, generator=g) + (2 * y[:, None] - 1) * 1.0
    return TensorDataset(x, y)


def _loader(ds: TensorDataset, shuffle: bool = True, generator: bool = True) -> DataLoader:
    gen = torch.Generator().manual_seed(123) if generator else None
    return DataLoader(ds, batch_size=32, shuffle=shuffle, generator=gen)


def _mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2)
    )


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def test_training_learns() -> None:
    ds = _data()
    model = _mlp()
    before = evaluate(model, _loader(ds, shuffle=False))
    hist = train(model, _loader(ds), epochs=4, lr=0.05, schedule="constant", progress=False)
    after = evaluate(model, _loader(ds, shuffle=False))
    assert len(hist) == 4 and hist.train_loss[-1] < hist.train_loss[0]
    assert after.loss < before.loss and after.accuracy > 0.8 and after.n == 256
    assert hist.val_loss == [None] * 4 and len(hist.seconds) == 4


def test_validation_history_and_log() -> None:
    ds = _data()
    records: list[dict] = []
    hist = train(
        _mlp(),
        _loader(ds),
        epochs=2,
        lr=0.05,
        val_loader=_loader(_data(64, seed=1), shuffle=False),
        progress=Bars(),  # the CLI's bars; not a TTY under pytest: silently disabled
        log=records.append,
    )
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["val_acc"] == hist.val_acc[-1] and hist.val_acc[-1] > 0.5
    assert TrainHistory.from_dict(hist.to_dict()) == hist


def test_lr_schedules() -> None:
    assert [lr_at(e, 8, 1.0, "step") for e in range(8)] == [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    assert [lr_at(e, 4, 0.5, "constant") for e in range(4)] == [0.5] * 4
    cos = [lr_at(e, 4, 1.0, "cosine") for e in range(4)]
    assert cos[0] == 1.0 and all(a > b for a, b in zip(cos, cos[1:], strict=False))
    with pytest.raises(ConfigError, match="unknown schedule"):
        lr_at(0, 4, 1.0, "linear")
    hist = train(_mlp(), _loader(_data(64)), epochs=4, lr=0.1, progress=False)
    assert hist.lr == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_l1_bn_shrinks_gammas() -> None:
    ds = _data()

    def gamma_l1(l1: float) -> float:
        model = _mlp()
        train(model, _loader(ds), epochs=3, lr=0.05, l1_bn=l1, schedule="constant", progress=False)
        return model[1].weight.abs().sum().item()

    assert gamma_l1(0.05) < 0.8 * gamma_l1(0.0)


def test_evaluate_restores_modes_and_handles_logits_objects() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _mlp()

        def forward(self, x: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(logits=self.inner(x))

    model = Wrapped().train()
    model.inner[1].eval()  # mixed modes are restored exactly
    res = evaluate(model, _loader(_data(64), shuffle=False))
    assert isinstance(res, EvalResult) and res.n == 64 and 0 <= res.accuracy <= 1
    assert model.training and model.inner[0].training and not model.inner[1].training
    with pytest.raises(DataError, match="no examples"):
        evaluate(model, [])


def test_non_finite_loss_raises_training_error() -> None:
    x = torch.randn(64, 8)
    x[40] = float("nan")
    ds = TensorDataset(x, torch.arange(64) % 2)
    with pytest.raises(TrainingError, match=r"epoch 1, batch 2.*lower the learning rate"):
        train(_mlp(), _loader(ds, shuffle=False), epochs=1, lr=0.1, progress=False)
    assert issubclass(TrainingError, EigenDamageError)
    with pytest.raises(TrainingError, match="lower the learning rate"):
        train(_mlp(), _loader(_data()), epochs=3, lr=1e10, momentum=0.0, progress=False)


def test_bad_arguments() -> None:
    for kwargs in ({"lr": 0.0}, {"momentum": 1.0}, {"schedule": "x"}, {"l1_bn": -1.0}):
        with pytest.raises(ConfigError):
            train(_mlp(), _loader(_data(32)), **{"epochs": 1, "lr": 0.1, **kwargs})
    with pytest.raises(DataError, match="no batches"):
        train(_mlp(), [], epochs=1, lr=0.1, progress=False)


class _Killed(Exception):
    pass


def _kill_after(epochs_done: int):
    def log(record: dict) -> None:
        if record["epoch"] == epochs_done:
            raise _Killed

    return log


@pytest.mark.parametrize("generator", [True, False])
def test_resume_is_bit_exact(tmp_path: Path, generator: bool) -> None:
    ds = _data(128)
    kwargs = {"epochs": 4, "lr": 0.05, "seed": 7, "progress": False}

    straight = _mlp(dropout=0.3)
    hist_a = train(straight, _loader(ds, generator=generator), **kwargs)

    resumed = _mlp(dropout=0.3)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(_Killed):
        train(
            resumed,
            _loader(ds, generator=generator),
            checkpoint_path=ckpt,
            log=_kill_after(2),
            **kwargs,
        )
    assert load_checkpoint(ckpt)["epoch"] == 2
    torch.randn(100)  # a new process would have different global RNG state

    fresh = _mlp(seed=99, dropout=0.3)  # weights come from the checkpoint, not from init
    hist_b = train(fresh, _loader(ds, generator=generator), checkpoint_path=ckpt, **kwargs)
    assert len(hist_b) == 4 and hist_b.train_loss == hist_a.train_loss
    for (k, a), (_, b) in zip(
        straight.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k

    # Already finished: resuming again trains nothing and keeps the weights.
    again = _mlp(seed=5, dropout=0.3)
    hist_c = train(again, _loader(ds, generator=generator), checkpoint_path=ckpt, **kwargs)
    assert hist_c.train_loss == hist_a.train_loss
    assert torch.equal(again[0].weight, straight[0].weight)


def test_resume_refuses_changed_settings_and_wrong_models(tmp_path: Path) -> None:
    ckpt = tmp_path / "c.pt"
    train(_mlp(), _loader(_data(64)), epochs=1, lr=0.1, checkpoint_path=ckpt, progress=False)
    with pytest.raises(TrainingError, match=r"lr=0\.1 -> 0\.2"):
        train(_mlp(), _loader(_data(64)), epochs=1, lr=0.2, checkpoint_path=ckpt, progress=False)
    with pytest.raises(CheckpointError, match="does not match this model"):
        train(_cnn(), [], epochs=1, lr=0.1, checkpoint_path=ckpt, progress=False)
    # resume=False starts over and overwrites.
    hist = train(
        _mlp(),
        _loader(_data(64)),
        epochs=2,
        lr=0.2,
        checkpoint_path=ckpt,
        resume=False,
        progress=False,
    )
    assert len(hist) == 2 and load_checkpoint(ckpt)["epoch"] == 2


def test_recalibrate_bn_matches_dataset_statistics() -> None:
    model = _cnn()
    x = torch.randn(96, 1, 6, 6) * 3 + 2
    loader = DataLoader(TensorDataset(x, torch.zeros(96, dtype=torch.long)), batch_size=32)
    bn = model[1]
    bn.running_mean.fill_(100.0)
    bn.momentum = 0.3
    model.eval()
    seen = recalibrate_bn(model, loader)
    assert seen == 96 and not model.training and bn.momentum == 0.3
    with torch.no_grad():
        h = model[0](x)
    assert torch.allclose(bn.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    # Cumulative average of per-batch unbiased variances (equal batch sizes).
    per_batch = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in h.split(32)]).mean(0)
    assert torch.allclose(bn.running_var, per_batch, atol=1e-4)

    bn.running_mean.fill_(5.0)
    assert recalibrate_bn(model, loader, batches=0) == 0
    assert torch.all(bn.running_mean == 5.0)
    assert recalibrate_bn(model, loader, batches=1) == 32
    assert torch.allclose(bn.running_mean, h[:32].mean(dim=(0, 2, 3)), atol=1e-5)


def test_recalibrate_bn_keeps_dropout_off() -> None:
    model = _mlp(dropout=0.9)
    loader = _loader(_data(64), shuffle=False)
    recalibrate_bn(model, loader)
    first = model[1].running_mean.clone()
    recalibrate_bn(model, loader)
    assert torch.equal(first, model[1].running_mean)  # deterministic: no dropout noise


def test_reseed_loader_reaches_the_augmentation_through_a_subset() -> None:
    """A pass after ``reseed_loader`` is a function of the seed alone, also when the
    augmented dataset is wrapped (``Subset``): its draws must not carry over."""
    from torch.utils.data import DataLoader, Dataset, Subset

    from eigendamage.train import reseed_loader

    class Augmented(Dataset):
        def __init__(self) -> None:
            self.gen = torch.Generator().manual_seed(0)

        def reseed(self, seed: int) -> None:
            self.gen.manual_seed(seed)

        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int):
            return torch.full((2,), float(i)) + torch.rand(2, generator=self.gen), i

    loader = DataLoader(Subset(Augmented(), range(6)), batch_size=3, shuffle=True,
                        generator=torch.Generator())  # fmt: skip
    passes = []
    for _ in range(2):
        reseed_loader(loader, 5)
        passes.append(torch.cat([x for x, _ in loader]))
    assert torch.equal(passes[0], passes[1])
