"""The run configurations (pydantic v2): strict models with a range on every number.

Why strict (``extra="forbid"``, ranges everywhere): a typo such as ``lrr = 0.1`` or a
negative damping would otherwise silently run the wrong experiment for hours.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import ConfigError

Schedule = Literal["step", "cosine", "constant"]
Fisher = Literal["true", "empirical"]

# Upper bounds a file from a stranger cannot exceed: beyond them a value is a mistake or an
# attack (a 1e308 learning rate overflows float32 inside the optimizer; a 2**70 seed overflows
# the RNG; a billion epochs never ends), and each would fail deep inside torch instead.
MAX_SEED = 2**32 - 1
MAX_EPOCHS = 100_000
MAX_ROUNDS = 1_000_000
MAX_RATE = 1e30  # rates, decay, L1, damping: beyond, float32 steps overflow (3.4e38)
MAX_BATCH = 1 << 20
MAX_WORKERS = 256
MAX_LIST = 1_000  # methods and budgets in one compare
DEVICE_TYPES = ("cpu", "cuda", "mps")

NORM_SUFFIX = "+norm"  # compare: "c-obd+norm" is c-obd with normalize=True


class _Strict(BaseModel):
    # strict: "3" is not an int and true is not a number; ints are still accepted for floats.
    model_config = ConfigDict(
        extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False
    )

    @classmethod
    def whole_problems(cls, data: Mapping[str, Any]) -> list[str]:
        """The rules across fields that ``data`` (raw values) breaks.  Why on raw data:
        pydantic checks them only once every field is valid, so an error message that lists
        every problem at once asks for them here."""
        return []

    @classmethod
    def choices(cls, field: str) -> list[str]:
        """The accepted values of ``field`` where they are a list of names (else empty)."""
        return []


def _check_device(value: str) -> str:
    """Accept ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``: devices that hold real data
    (``meta`` holds none, and backends such as ``xla`` are not supported); whether the
    device exists on this machine is checked when the run starts."""
    if value == "auto":
        return value
    import torch

    choices = "use auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"not a device name: {choices}") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device type {device.type!r} is not supported: {choices}")
    return value


class TrainConfig(_Strict):
    """Training from scratch (or further training) of a model on a dataset."""

    model: str = Field(min_length=1)
    dataset: str = Field(default="digits", min_length=1)
    data_root: str | None = None
    epochs: int = Field(default=30, ge=0, le=MAX_EPOCHS)
    batch_size: int = Field(default=128, ge=1, le=MAX_BATCH)
    lr: float = Field(default=0.1, gt=0, le=MAX_RATE)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0, le=MAX_RATE)
    schedule: Schedule = "step"
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    device: str = "auto"
    l1_bn: float = Field(
        default=0.0, ge=0, le=MAX_RATE, description="Network-slimming L1 penalty on BN gammas"
    )
    num_workers: int = Field(default=0, ge=0, le=MAX_WORKERS)

    @field_validator("device")
    @classmethod
    def _valid_device(cls, v: str) -> str:
        return _check_device(v)


class FineTuneConfig(_Strict):
    """Fine-tuning after each pruning round (``epochs=0`` skips it)."""

    epochs: int = Field(default=10, ge=0, le=MAX_EPOCHS)
    lr: float = Field(default=0.01, gt=0, le=MAX_RATE)
    weight_decay: float = Field(default=5e-4, ge=0, le=MAX_RATE)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    schedule: Schedule = "cosine"
    bn_recalibration_batches: int | None = Field(
        default=20,
        ge=0,
        description="batches for BN statistics after surgery; 0 = skip, null = all",
    )


PICKLE_IN_FILE = (
    "allow_pickle cannot be set in a file; remove it and pass --allow-pickle on the command line"
)


class _PruneCommon(_Strict):
    """Fields shared by ``prune`` and ``compare``."""

    BUDGETS: ClassVar[tuple[str, ...]] = ()  # the budget fields, of which one is given

    model: str | None = Field(default=None, min_length=1, description="model registry name")
    checkpoint: str | None = Field(
        default=None,
        min_length=1,
        description="directory written by save_model (or a state_dict / legacy torch.save file)",
    )
    dataset: str = Field(default="digits", min_length=1)
    data_root: str | None = None
    rounds: int = Field(default=1, ge=1, le=MAX_ROUNDS)
    per_layer_cap: float = Field(
        default=0.95, gt=0, le=1, description="largest fraction of one layer's units to remove"
    )
    fisher: Fisher = "true"
    fisher_batches: int | None = Field(default=None, ge=1, description="null = whole loader")
    fisher_samples: int = Field(default=1, ge=1, le=1_000)
    damping: float | None = Field(
        default=None, ge=0, le=MAX_RATE, description="relative damping; null = the method's default"
    )
    normalize: bool = Field(
        default=False,
        description="channel criteria: divide each layer's scores by their sum before ranking",
    )
    exclude: list[str] = Field(
        default_factory=list,
        max_length=MAX_LIST,
        description="modules never pruned (names as in model.named_modules())",
    )
    finetune: FineTuneConfig = Field(default_factory=FineTuneConfig)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    device: str = "auto"
    batch_size: int = Field(default=128, ge=1, le=MAX_BATCH)

    @field_validator("exclude")
    @classmethod
    def _module_names(cls, v: list[str]) -> list[str]:
        if any(not name.strip() for name in v):
            raise ValueError("module names must be non-empty")
        return v

    @field_validator("device")
    @classmethod
    def _valid_device(cls, v: str) -> str:
        return _check_device(v)

    @model_validator(mode="before")
    @classmethod
    def _no_pickle_switch(cls, data: Any) -> Any:
        """Unpickling runs code, so only ``--allow-pickle`` typed on the command line may
        allow it: never a config file, a resumed run's ``config.json`` or a compare config.
        ``false`` (written by older versions into every run's ``config.json``) is dropped."""
        if isinstance(data, Mapping) and "allow_pickle" in data:
            if data["allow_pickle"] is not False:
                raise ValueError(PICKLE_IN_FILE)
            data = {k: v for k, v in data.items() if k != "allow_pickle"}
        return data

    @classmethod
    def whole_problems(cls, data: Mapping[str, Any]) -> list[str]:
        """A source of the model, and exactly one of the budgets (:attr:`BUDGETS`)."""
        problems = []
        if data.get("model") is None and data.get("checkpoint") is None:
            problems.append(
                "give 'model' (a registry name) or 'checkpoint' (both only for a state_dict "
                "file whose architecture 'model' names)"
            )
        given = [n for n in cls.BUDGETS if data.get(n) is not None]
        if len(given) != 1:
            got = f"got {', '.join(given)}" if given else "got none"
            problems.append(f"give exactly one of {', '.join(cls.BUDGETS)} ({got})")
        return problems

    @model_validator(mode="after")
    def _whole(self) -> _PruneCommon:
        problems = self.whole_problems(
            {name: getattr(self, name) for name in type(self).model_fields}
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PruneConfig(_PruneCommon):
    """One pruning run: a method and one budget.

    ``ratio`` is the fraction of prunable units removed per the method's global ranking;
    ``target_params``/``target_flops`` are the fraction of the original count to *keep*.
    """

    BUDGETS: ClassVar[tuple[str, ...]] = ("ratio", "target_params", "target_flops")
    method: str = Field(min_length=1)
    ratio: float | None = Field(default=None, gt=0, lt=1)
    target_params: float | None = Field(default=None, gt=0, le=1)
    target_flops: float | None = Field(default=None, gt=0, le=1)

    @classmethod
    def choices(cls, field: str) -> list[str]:
        """The method names for ``method``."""
        if field != "method":
            return []
        from ..methods import available_methods

        return available_methods()

    @model_validator(mode="after")
    def _normalize_taken(self) -> PruneConfig:
        if self.normalize:
            from ..methods import available_methods, check_normalize

            if self.method in available_methods():  # unknown names: the run names them
                try:
                    check_normalize(self.method, True)
                except ConfigError as exc:
                    raise ValueError(str(exc)) from None
        return self


class CompareConfig(_PruneCommon):
    """Several methods at several budgets on the same model, for tables and trade-off plots."""

    BUDGETS: ClassVar[tuple[str, ...]] = ("ratios", "target_params", "target_flops")
    methods: list[str] = Field(min_length=1, max_length=MAX_LIST)
    ratios: list[float] | None = Field(default=None, min_length=1, max_length=MAX_LIST)
    target_params: list[float] | None = Field(default=None, min_length=1, max_length=MAX_LIST)
    target_flops: list[float] | None = Field(default=None, min_length=1, max_length=MAX_LIST)

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, v: list[str]) -> list[str]:
        if any(not m for m in v):
            raise ValueError("method names must be non-empty")
        dupes = sorted({m for m in v if v.count(m) > 1})
        if dupes:
            raise ValueError(f"duplicate methods: {', '.join(dupes)}")
        return v

    @field_validator("ratios")
    @classmethod
    def _ratio_range(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(not 0 < r < 1 for r in v):
            raise ValueError("every ratio must be in (0, 1)")
        return v

    @field_validator("target_params", "target_flops")
    @classmethod
    def _target_range(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(not 0 < t <= 1 for t in v):
            raise ValueError("every target must be in (0, 1]")
        return v

    def runs(self) -> list[PruneConfig]:
        """One PruneConfig per (method, budget), methods outermost, in the given orders.

        A method named ``NAME+norm`` is ``NAME`` with ``normalize=True``; ``normalize`` set
        on the comparison normalises every channel criterion (other methods run as they
        are), so one table can hold both protocols side by side."""
        from ..criteria import CRITERIA

        out = []
        for name in self.methods:
            method = name.removesuffix(NORM_SUFFIX)
            norm = name != method or (self.normalize and method in CRITERIA)
            # exactly one of the three budget lists is given (validated)
            out += [self._run(method, norm, ratio=r) for r in self.ratios or ()]
            out += [self._run(method, norm, target_params=t) for t in self.target_params or ()]
            out += [self._run(method, norm, target_flops=t) for t in self.target_flops or ()]
        return out

    def _run(
        self,
        method: str,
        normalize: bool,
        *,
        ratio: float | None = None,
        target_params: float | None = None,
        target_flops: float | None = None,
    ) -> PruneConfig:
        """The run of ``method`` at one budget, with every setting the runs share."""
        return PruneConfig(
            model=self.model,
            checkpoint=self.checkpoint,
            dataset=self.dataset,
            data_root=self.data_root,
            rounds=self.rounds,
            per_layer_cap=self.per_layer_cap,
            exclude=list(self.exclude),
            fisher=self.fisher,
            fisher_batches=self.fisher_batches,
            fisher_samples=self.fisher_samples,
            damping=self.damping,
            normalize=normalize,
            finetune=self.finetune.model_copy(),
            seed=self.seed,
            device=self.device,
            batch_size=self.batch_size,
            method=method,
            ratio=ratio,
            target_params=target_params,
            target_flops=target_flops,
        )
