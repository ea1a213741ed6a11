"""The typed exceptions of the SPEFT core; callers map them to HTTP or CLI errors in one place."""
from __future__ import annotations


class SpeftError(Exception):
    """Base class of every error the core raises on purpose."""

    code: str = "speft_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(SpeftError, ValueError):
    """A job or method setting is invalid; `param` names the offending field."""

    code = "invalid_config"


class UnknownMetricError(ConfigError):
    """The salience metric name is not registered."""

    code = "unknown_metric"


class TargetsError(ConfigError):
    """No Linear module matches the target patterns, or a pattern is malformed."""

    code = "invalid_targets"


class DatasetFormatError(SpeftError, ValueError):
    """A dataset line is not valid for the task; `line` is 1-based (None for file-level problems)."""

    code = "invalid_dataset"

    def __init__(self, message: str, *, line: int | None = None, param: str | None = None) -> None:
        where = f"line {line}: " if line is not None else ""
        super().__init__(where + message, param=param)
        self.line = line


class DeltaFormatError(SpeftError, ValueError):
    """A delta file is unreadable, truncated, or internally inconsistent."""

    code = "invalid_delta"


class DeltaMismatchError(SpeftError, ValueError):
    """A delta does not belong to this base model (fingerprint, module or shape mismatch)."""

    code = "delta_mismatch"


class DeltaStateError(SpeftError, RuntimeError):
    """A delta is already applied (revert it first), or none is applied when reverting."""

    code = "delta_state"


class ModelLoadError(SpeftError, ValueError):
    """A base model name or folder cannot be resolved to loadable weights."""

    code = "model_not_found"


class TrainingCancelled(SpeftError):
    """The cancel check returned True; training stopped between steps."""

    code = "cancelled"


class TrainingPaused(SpeftError):
    """The pause check returned True: a checkpoint with the training state was handed to the
    checkpoint callback, then training stopped between steps; `step` is the last step done."""

    code = "paused"

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step
