"""speft_core: salience-aware sparse fine-tuning (SPEFT) as a plain library.

    from speft_core import JobSpec, fine_tune, save_delta
    result = fine_tune(JobSpec.from_dict({...}))   # score, select, train
    save_delta(result.delta, "sst2.safetensors")   # indices + values only
"""
from .config import JobSpec, SpeftConfig, TrainConfig
from .delta import (
    Delta,
    apply_delta,
    delta_to_bytes,
    fingerprint,
    load_delta,
    merge_delta,
    revert_delta,
    save_delta,
    verify_delta,
)
from .errors import (
    ConfigError,
    DatasetFormatError,
    DeltaFormatError,
    DeltaMismatchError,
    DeltaStateError,
    ModelLoadError,
    SpeftError,
    TargetsError,
    TrainingCancelled,
    UnknownMetricError,
)
from .masks import drop_and_grow, select_mask
from .models import load_model, load_tokenizer, registered_models, resolve_model
from .progress import PHASES, PhaseReport, StepReport, TrainCallbacks
from .salience import METRICS, SalienceInputs, compute_salience
from .sparse_linear import SparseDeltaLinear, inject_sparse_deltas, remove_sparse_deltas
from .targets import find_target_linears
from .train import TrainResult, fine_tune, train_sparse

__all__ = [
    "METRICS", "PHASES", "ConfigError", "DatasetFormatError", "Delta", "DeltaFormatError",
    "DeltaMismatchError", "DeltaStateError", "JobSpec", "ModelLoadError", "PhaseReport",
    "SalienceInputs", "SparseDeltaLinear", "SpeftConfig", "SpeftError", "StepReport",
    "TargetsError", "TrainCallbacks", "TrainConfig", "TrainResult", "TrainingCancelled", "UnknownMetricError",
    "apply_delta", "compute_salience", "delta_to_bytes", "drop_and_grow", "find_target_linears",
    "fine_tune", "fingerprint", "inject_sparse_deltas", "load_delta", "load_model",
    "load_tokenizer", "merge_delta", "registered_models", "remove_sparse_deltas",
    "resolve_model", "revert_delta", "save_delta", "select_mask", "train_sparse", "verify_delta",
]
