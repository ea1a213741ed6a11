"""Configuration dataclasses: the SPEFT method settings, the training hyperparameters, a whole job.

Field defaults and limits live here once; the REST schemas and the CLI read them from here.
Every dataclass validates itself on construction and raises `ConfigError(param=...)`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError, TargetsError
from .targets import check_target_patterns

TASKS: tuple[str, ...] = ("classification", "causal_lm")
MASK_KINDS: tuple[str, ...] = ("static", "dynamic")
SCOPES: tuple[str, ...] = ("global", "layer")
SCORE_NORMALIZATIONS: tuple[str, ...] = ("none", "module")
SPREAD_LINES: tuple[str, ...] = ("both", "inputs", "outputs")
AUTO = "auto"
# spread_cap "auto": this cap on classification, none on causal LM (the quality suite's screen)
AUTO_SPREAD_CAP = 4.0
# mask "auto": dynamic on causal LM, static on classification (the quality suite's screen);
# update_interval "auto": about this many re-selections in a job, at least this many steps apart
AUTO_MASK_UPDATES = 12
AUTO_MIN_UPDATE_INTERVAL = 8
DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32")
SELECTIONS: tuple[str, ...] = ("best", "last")
MAX_CHECKPOINTS = 1000

Task = Literal["classification", "causal_lm"]

# Bounds a service can rely on; a user asking for more gets a ConfigError naming the field.
MAX_EPOCHS = 100
MAX_BATCH_SIZE = 1024
MAX_LENGTH = 8192  # tokens an example may hold; also the memory cap of max_length "auto"
MAX_SCORING_EXAMPLES = 100_000


# Validators that read this attribute (pydantic, in the REST schemas) refuse unknown fields.
_REFUSE_UNKNOWN_FIELDS = {"extra": "forbid"}


@dataclass(frozen=True)
class SpeftConfig:
    """How the sparse delta is chosen and maintained."""

    __pydantic_config__ = _REFUSE_UNKNOWN_FIELDS

    metric: str = field(default="gradient", metadata={"help": "salience metric (see speft_core.METRICS)"})
    density: float | int = field(
        default=0.01,
        metadata={"help": "fraction (0, 1] of the targeted weights, or an integer count > 1"},
    )
    mask: str = field(
        default=AUTO,
        metadata={"help": "'static' (chosen once), 'dynamic' (re-selected every update_interval "
                          "steps: the lowest |value| entries dropped, the most salient grown), "
                          "or 'auto' (default): dynamic on causal LM, static on classification"},
    )
    scope: str = field(default="global", metadata={"help": "top-k over all targets or per layer"})
    target_modules: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Linear module name patterns; None = attention and MLP Linears"},
    )
    scoring_examples: int = field(
        default=1024, metadata={"help": "training examples used to compute salience"}
    )
    scoring_batch_size: int | None = field(
        default=None,
        metadata={"help": "examples per scoring micro-batch (gradients accumulate over them); "
                          "None = the training batch_size"},
    )
    update_interval: int | Literal["auto"] = field(
        default=AUTO,
        metadata={"help": "dynamic mask: optimizer steps between re-selections; 'auto' "
                          "(default): the job's steps / 12, at least 8; 0: never (with mask "
                          "'auto', a static mask)"},
    )
    update_fraction: float = field(
        default=0.1, metadata={"help": "dynamic mask: fraction of entries dropped and regrown"}
    )
    score_normalization: str = field(
        default="module",
        metadata={"help": "'module' (default): divide each module's scores by their mean "
                          "before the global top-k, so no module's scale crowds out the "
                          "others; 'none': rank the raw scores"},
    )
    module_floor: float = field(
        default=0.0,
        metadata={"help": "fraction [0, 1] of the budget given to every module in proportion "
                          "to its size (per-layer top-k); the rest is ranked globally"},
    )
    explore_fraction: float = field(
        default=0.0,
        metadata={"help": "fraction [0, 1) of the budget given to uniformly random entries "
                          "outside the salience choice"},
    )
    spread_cap: float | Literal["auto"] = field(
        default=AUTO,
        metadata={"help": "0 (off), or at least 1: no row or column of a module holds more "
                          "than this many times its even share of the budget (density x the "
                          "row's or column's length); summed gradients otherwise pile onto a "
                          "few features. 'auto' (default): 4 on classification, 0 on causal "
                          "LM and with a module_floor"},
    )
    spread_lines: str = field(
        default="both",
        metadata={"help": "which lines spread_cap caps: 'both' rows and columns, 'inputs' the "
                          "columns (input features) only, 'outputs' the rows only"},
    )
    scoring_holdout: float = field(
        default=0.0,
        metadata={"help": "fraction [0, 0.5] of the training examples held out of the head "
                          "warm-up and used alone for salience scoring (all of them still "
                          "train afterwards); 0: warm-up and scoring draw from all"},
    )
    head_warmup_steps: int = field(
        default=16,
        metadata={"help": "classification: optimizer steps that train the new head alone "
                          "before salience is scored (a random head gives noisy gradients; "
                          "the quality suite's best lever); 0: off"},
    )

    def __post_init__(self) -> None:
        from .salience import METRICS  # late import: salience imports nothing from here at load

        if self.metric not in METRICS:
            from .errors import UnknownMetricError

            raise UnknownMetricError(
                f"unknown metric {self.metric!r}; valid metrics: {', '.join(sorted(METRICS))}",
                param="metric",
            )
        _check_density(self.density)
        _check_choice("mask", self.mask, (*MASK_KINDS, AUTO))
        _check_choice("scope", self.scope, SCOPES)
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(
                isinstance(p, str) and p for p in self.target_modules
            ):
                raise ConfigError(
                    "target_modules must be a list of non-empty strings or null",
                    param="target_modules",
                )
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise ConfigError("target_modules must not be empty", param="target_modules")
        _check_int_range("scoring_examples", self.scoring_examples, 1, MAX_SCORING_EXAMPLES)
        if self.scoring_batch_size is not None:
            _check_int_range("scoring_batch_size", self.scoring_batch_size, 1, MAX_BATCH_SIZE)
        if self.update_interval != AUTO:
            _check_int_range("update_interval", self.update_interval, 0, 10**9)
        if self.mask == "dynamic" and self.update_interval == 0:
            raise ConfigError(
                "a dynamic mask needs update_interval >= 1 (steps between re-selections)",
                param="update_interval",
            )
        _check_positive_float("update_fraction", self.update_fraction, upper=1.0)
        _check_choice("score_normalization", self.score_normalization, SCORE_NORMALIZATIONS)
        _check_float_range("module_floor", self.module_floor, 0.0, 1.0)
        _check_float_range("explore_fraction", self.explore_fraction, 0.0, 1.0)
        if float(self.explore_fraction) >= 1.0:
            raise ConfigError("explore_fraction must be below 1", param="explore_fraction")
        _check_int_range("head_warmup_steps", self.head_warmup_steps, 0, 100_000)
        if self.spread_cap != AUTO:
            _check_float_range("spread_cap", self.spread_cap, 0.0, 1000.0)
            if 0 < float(self.spread_cap) < 1:
                raise ConfigError("spread_cap must be 0 (off), at least 1, or 'auto'",
                                  param="spread_cap")
            if self.spread_cap and self.module_floor:
                raise ConfigError("spread_cap and module_floor cannot be combined; set one of "
                                  "them to 0", param="spread_cap")
        _check_choice("spread_lines", self.spread_lines, SPREAD_LINES)
        _check_float_range("scoring_holdout", self.scoring_holdout, 0.0, 0.5)

    def spread_cap_for(self, task: str | None) -> float:
        """The row and column cap in force for `task` ('auto': AUTO_SPREAD_CAP on
        classification without a module floor, else 0; None: the task is unknown, no cap)."""
        if self.spread_cap != AUTO:
            return float(self.spread_cap)
        return AUTO_SPREAD_CAP if task == "classification" and not self.module_floor else 0.0

    def mask_for(self, task: str | None) -> str:
        """The mask kind in force for `task`: 'static' or 'dynamic' ('auto': dynamic on causal
        LM unless update_interval is 0, else static; None: the task is unknown, static)."""
        if self.mask != AUTO:
            return self.mask
        return "dynamic" if task == "causal_lm" and self.update_interval != 0 else "static"

    def update_interval_for(self, total_steps: int) -> int:
        """Optimizer steps between re-selections in a job of `total_steps` steps ('auto':
        ceil(total_steps / AUTO_MASK_UPDATES), at least AUTO_MIN_UPDATE_INTERVAL)."""
        if self.update_interval != AUTO:
            return int(self.update_interval)
        return max(AUTO_MIN_UPDATE_INTERVAL, math.ceil(total_steps / AUTO_MASK_UPDATES))


AUTO_FIELDS: tuple[str, ...] = ("n_epochs", "batch_size", "learning_rate")
AUTO_RULES = (
    "n_epochs: ceil(3000 / examples), between 1 and 10 (about 3,000 examples seen); "
    "batch_size: 32 from 1,024 examples, else the largest power of two <= examples / 32, at "
    "least 4; learning_rate: 0.01 (the median of the rates the quality suite chose on dev for "
    "SPEFT-gradient at 1% over its five tasks)")
AUTO_LEARNING_RATE = 0.01


def resolve_auto(hyper: TrainConfig, examples: int) -> TrainConfig:
    """`hyper` with each 'auto' of n_epochs, batch_size, learning_rate chosen by AUTO_RULES
    for a training set of `examples` examples."""
    chosen: dict[str, Any] = {}
    if hyper.n_epochs == AUTO:
        chosen["n_epochs"] = min(10, max(1, math.ceil(3000 / max(examples, 1))))
    if hyper.batch_size == AUTO:
        chosen["batch_size"] = (32 if examples >= 1024
                                else max(4, 2 ** int(math.log2(max(examples // 32, 1)))))
    if hyper.learning_rate == AUTO:
        chosen["learning_rate"] = AUTO_LEARNING_RATE
    return dataclasses.replace(hyper, **chosen) if chosen else hyper


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when the validation loss has not improved by more than `min_delta` for `patience`
    checkpoints in a row."""

    __pydantic_config__ = _REFUSE_UNKNOWN_FIELDS

    patience: int = field(default=3, metadata={"help": "checkpoints without improvement"})
    min_delta: float = field(default=0.0, metadata={"help": "the least drop that counts"})

    def __post_init__(self) -> None:
        _check_int_range("patience", self.patience, 1, MAX_CHECKPOINTS)
        _check_float_range("min_delta", self.min_delta, 0.0, 1e6)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyperparameters (the REST job's `hyperparameters`)."""

    __pydantic_config__ = _REFUSE_UNKNOWN_FIELDS

    n_epochs: int | Literal["auto"] = field(
        default=3, metadata={"help": "epochs, or 'auto' (see AUTO_RULES)"})
    batch_size: int | Literal["auto"] = field(
        default=32, metadata={"help": "examples per step, or 'auto' (see AUTO_RULES)"})
    learning_rate: float | Literal["auto"] = field(
        default=5e-4, metadata={"help": "AdamW's peak rate, or 'auto' (see AUTO_RULES)"})
    max_length: int | Literal["auto"] = field(
        default=AUTO,
        metadata={"help": "tokens an example may hold, or 'auto': the model's context, at most "
                          "8192 (MAX_LENGTH, the memory cap). A longer text is truncated; a "
                          "longer chat conversation is dropped and counted in an event. Batches "
                          "are as long as their longest example"})
    seed: int = 42
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    head_learning_rate: float | None = None  # defaults to learning_rate
    dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the frozen base weights: 'auto' (the checkpoint's or the "
                          "registered model's), bfloat16, float16 or float32; the trained "
                          "values and their optimizer state are always float32"},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in the backward pass (less memory, ~1/3 "
                          "more compute); models that support it only"},
    )
    n_checkpoints: int | None = field(
        default=None,
        metadata={"help": "checkpoints evenly spaced over the run (default: one per epoch)"},
    )
    checkpoint_every_steps: int | None = field(
        default=None, metadata={"help": "a checkpoint every this many steps (and at the end)"},
    )
    keep_checkpoints: int | None = field(
        default=None,
        metadata={"help": "keep at most this many checkpoints, the newest (the best one is "
                          "always kept); None keeps all"},
    )
    select: str = field(
        default="best",
        metadata={"help": "the delta a run returns: 'best' (lowest validation loss over the "
                          "checkpoints, where there is a validation set) or 'last'"},
    )
    early_stopping: EarlyStopping | None = field(
        default=None,
        metadata={"help": "stop when the validation loss stops improving (needs a validation "
                          "set)"},
    )

    def __post_init__(self) -> None:
        if self.n_epochs != AUTO:
            _check_int_range("n_epochs", self.n_epochs, 1, MAX_EPOCHS)
        if self.batch_size != AUTO:
            _check_int_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        if self.max_length != AUTO:
            _check_int_range("max_length", self.max_length, 2, MAX_LENGTH)
        _check_int_range("seed", self.seed, 0, 2**32 - 1)
        _check_int_range("gradient_accumulation_steps", self.gradient_accumulation_steps, 1, 1024)
        if self.learning_rate != AUTO:
            _check_positive_float("learning_rate", self.learning_rate, upper=10.0)
        if self.head_learning_rate is not None:
            _check_positive_float("head_learning_rate", self.head_learning_rate, upper=10.0)
        _check_float_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _check_float_range("weight_decay", self.weight_decay, 0.0, 10.0)
        _check_float_range("max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        _check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError("gradient_checkpointing must be true or false",
                              param="gradient_checkpointing")
        for name in ("n_checkpoints", "checkpoint_every_steps", "keep_checkpoints"):
            if getattr(self, name) is not None:
                _check_int_range(name, getattr(self, name), 1,
                                 10**9 if name == "checkpoint_every_steps" else MAX_CHECKPOINTS)
        if self.n_checkpoints is not None and self.checkpoint_every_steps is not None:
            raise ConfigError("give n_checkpoints or checkpoint_every_steps, not both",
                              param="checkpoint_every_steps")
        _check_choice("select", self.select, SELECTIONS)
        if isinstance(self.early_stopping, Mapping):
            object.__setattr__(self, "early_stopping",
                               _build(EarlyStopping, self.early_stopping, "early_stopping"))
        elif self.early_stopping is not None and not isinstance(self.early_stopping,
                                                                 EarlyStopping):
            raise ConfigError("early_stopping must be an object or null", param="early_stopping")


@dataclass(frozen=True)
class JobSpec:
    """One fine-tuning job: the REST body, with files as local paths when run from the CLI."""

    model: str
    training_file: str
    task: str = "classification"
    validation_file: str | None = None
    speft: SpeftConfig = field(default_factory=SpeftConfig)
    hyperparameters: TrainConfig = field(default_factory=TrainConfig)
    suffix: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model must be a non-empty string", param="model")
        if not isinstance(self.training_file, str) or not self.training_file:
            raise ConfigError("training_file must be a non-empty string", param="training_file")
        _check_choice("task", self.task, TASKS)
        if self.speft.target_modules is not None:  # bounded and RE2-compilable before any load
            try:
                check_target_patterns(self.speft.target_modules)
            except TargetsError as err:
                err.param = f"method.speft.{err.param}"
                raise

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> JobSpec:
        """Build a spec from a REST-style job body; unknown or invalid fields raise ConfigError."""
        if not isinstance(body, Mapping):
            raise ConfigError("the job spec must be a JSON object")
        body = dict(body)
        known = {"model", "training_file", "validation_file", "task", "method",
                 "hyperparameters", "suffix", "metadata"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ConfigError(f"unknown field {unknown[0]!r}", param=unknown[0])
        method = body.pop("method", None) or {}
        if not isinstance(method, Mapping):
            raise ConfigError("method must be an object", param="method")
        if method.get("type", "speft") != "speft":
            raise ConfigError("method.type must be 'speft'", param="method.type")
        speft = _build(SpeftConfig, method.get("speft") or {}, "method.speft")
        hyper = _build(TrainConfig, body.pop("hyperparameters", None) or {}, "hyperparameters")
        missing = [name for name in ("model", "training_file") if name not in body]
        if missing:
            raise ConfigError(f"missing required field {missing[0]!r}", param=missing[0])
        return cls(speft=speft, hyperparameters=hyper, **body)

    def to_dict(self) -> dict[str, Any]:
        """The REST-style body this spec was built from (with defaults filled in)."""
        speft = dataclasses.asdict(self.speft)
        if speft["target_modules"] is not None:
            speft["target_modules"] = list(speft["target_modules"])
        return {
            "model": self.model,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "task": self.task,
            "method": {"type": "speft", "speft": speft},
            "hyperparameters": dataclasses.asdict(self.hyperparameters),
            "suffix": self.suffix,
            "metadata": dict(self.metadata),
        }


def _build(cls: type, values: Any, prefix: str) -> Any:
    """Construct dataclass `cls` from a mapping, prefixing the failing field's name with `prefix`."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix} must be an object", param=prefix)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown field {unknown[0]!r}", param=f"{prefix}.{unknown[0]}")
    try:
        return cls(**values)
    except ConfigError as err:
        err.param = f"{prefix}.{err.param}" if err.param else prefix
        raise


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}", param=name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int_range(name: str, value: Any, low: int, high: int) -> None:
    if not _is_int(value) or not (low <= value <= high):
        raise ConfigError(f"{name} must be an integer in [{low}, {high}]; got {value!r}", param=name)


def _check_finite_number(name: str, value: Any) -> None:
    """A number (not a bool), and neither NaN nor infinite."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number; got {value!r}", param=name)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}", param=name)


def _check_float_range(name: str, value: Any, low: float, high: float) -> None:
    _check_finite_number(name, value)
    if not low <= value <= high:
        raise ConfigError(f"{name} must be a number in [{low}, {high}]; got {value!r}", param=name)


def _check_positive_float(name: str, value: Any, *, upper: float) -> None:
    _check_finite_number(name, value)
    if not 0.0 < value <= upper:
        raise ConfigError(f"{name} must be a number in (0, {upper}]; got {value!r}", param=name)


def _check_density(density: Any) -> None:
    """Density is a fraction in (0, 1] or an integer count > 1 (floats like 50.0 count too)."""
    _check_finite_number("density", density)
    if density <= 0:
        raise ConfigError("density must be in (0, 1] or an integer count > 1", param="density")
    if density > 1 and float(density) != int(density):
        raise ConfigError(
            "density above 1 is an absolute count and must be a whole number", param="density"
        )


def resolve_density(density: float, total: int) -> int:
    """Number of entries to train: `density` as a fraction of `total`, or an absolute count."""
    if density > 1:
        count = int(density)
        if count > total:
            raise ConfigError(
                f"density asks for {count} entries but the targets hold only {total} weights",
                param="density",
            )
        return count
    return max(1, min(total, int(round(float(density) * total))))
