"""Base models: the built-in registry, server-side folders and stored archives in `base_models`."""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.db import dialect_insert
from api.core.model_cache import ModelArchiveError, cache_archive, local_model_folder
from api.core.models import RegisteredModel, utcnow
from api.core.storage import ObjectNotFound, Storage
from api.errors import InvalidRequest, NotFound
from speft_core.config import DTYPES, TASKS
from speft_core.models import registered_models


def count_parameters(model_dir: Path) -> int:
    """Parameters in a model folder, from its safetensors headers (no tensor is loaded)."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())  # noqa: SIM118 (not a dict)
    if total == 0:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            total = int(json.loads(index.read_text()).get("metadata", {}).get("total_parameters", 0))
    return total


MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _check_registration(model_id: str, task: str, dtype: str) -> None:
    """Refuse a malformed model id, an unknown task or an unknown dtype."""
    if not MODEL_ID_PATTERN.match(model_id):
        raise InvalidRequest("model ids are 1-128 letters, digits, '.', '_' or '-'", param="model")
    if task not in TASKS:
        raise InvalidRequest(f"task must be one of {', '.join(TASKS)}", param="task")
    if dtype not in DTYPES:
        raise InvalidRequest(f"dtype must be one of {', '.join(DTYPES)}", param="dtype")


def _model_folder_params(folder: Path, *, shown: str, param: str) -> int:
    """Parameters of a HF model folder with safetensors weights; InvalidRequest(param) otherwise."""
    try:
        params = count_parameters(folder) if (folder / "config.json").is_file() else 0
    except (OSError, SafetensorError):
        params = 0
    if params == 0:
        raise InvalidRequest(f"{shown} is not a HF model folder with safetensors weights",
                             param=param)
    return params


def _upsert_model(session: Session, *, model_id: str, task: str, params: int, dtype: str,
                  local_path: Path | None = None, storage_key: str | None = None,
                  sha256: str | None = None) -> None:
    """Insert or replace the row `model_id`; where its weights are is exactly what is given."""
    values = {"task": task, "params": params, "dtype": dtype, "storage_key": storage_key,
              "sha256": sha256, "local_path": str(local_path) if local_path is not None else None}
    statement = dialect_insert(session, RegisteredModel).values(
        id=model_id, created_at=utcnow(), **values
    )
    session.execute(statement.on_conflict_do_update(index_elements=["id"], set_=values))


def register_builtin_models(session: Session) -> list[str]:
    """Upsert `speft_core.models.registered_models()` into base_models; return their ids."""
    sources = registered_models()
    for source in sources.values():
        _upsert_model(session, model_id=source.name, task=source.task, dtype=source.dtype,
                      params=count_parameters(source.path), local_path=source.path)
    return list(sources)


def register_local_model(session: Session, *, model_id: str, task: str, path: Path,
                         models_dir: Path | None, dtype: str = "auto") -> RegisteredModel:
    """Register a server-side HF model folder; it must lie inside `models_dir` (no escape).

    `dtype` is what jobs saying `dtype: "auto"` train in and what serving loads it in."""
    _check_registration(model_id, task, dtype)
    if models_dir is None:
        raise InvalidRequest("set SPEFT_MODELS_DIR to the folder server-side models live in",
                             param="path")
    root = models_dir.expanduser().resolve()
    folder = (root / path).resolve() if not path.is_absolute() else path.resolve()
    if not folder.is_relative_to(root):
        raise InvalidRequest(f"{path} is outside SPEFT_MODELS_DIR ({root})", param="path")
    params = _model_folder_params(folder, shown=str(folder), param="path")
    _upsert_model(session, model_id=model_id, task=task, params=params, dtype=dtype,
                  local_path=folder)
    return get_model(session, model_id=model_id)


def register_stored_model(session: Session, *, storage: Storage, model_id: str, task: str,
                          storage_key: str, cache_dir: Path,
                          dtype: str = "auto") -> RegisteredModel:
    """Register the tar archive of a HF model folder stored under `storage_key`.

    Its sha256 is recorded (workers verify their download against it) and it is unpacked once
    into `cache_dir` (the worker's model cache) to check it is a model and count its parameters.
    `dtype` is as for `register_local_model`.
    """
    _check_registration(model_id, task, dtype)
    try:
        with storage.open_local(storage_key) as archive:  # one download: hashed, then unpacked
            with archive.open("rb") as handle:
                sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
            folder = cache_archive(archive, storage_key=storage_key, sha256=sha256,
                                   cache_dir=cache_dir)
    except ValueError as err:  # the storage layer refuses a malformed key
        raise InvalidRequest(str(err), param="storage_key") from err
    except ObjectNotFound as err:
        raise InvalidRequest(f"no object is stored under {storage_key}",
                             param="storage_key") from err
    except ModelArchiveError as err:
        raise InvalidRequest(err.message, param="storage_key") from err
    params = _model_folder_params(folder, shown=f"the archive at {storage_key}",
                                  param="storage_key")
    _upsert_model(session, model_id=model_id, task=task, params=params, dtype=dtype,
                  storage_key=storage_key, sha256=sha256)
    return get_model(session, model_id=model_id)


def list_models(session: Session) -> list[RegisteredModel]:
    """All base models, by id."""
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.id)))


def get_model(session: Session, *, model_id: str) -> RegisteredModel:
    """The base model `model_id`; NotFound when it is not registered."""
    row = session.get(RegisteredModel, model_id)
    if row is None:
        raise NotFound(f"no such model: {model_id}", param="model")
    return row


def model_reference(session: Session, *, storage: Storage, model_id: str,
                    cache_dir: Path) -> str:
    """What speft_core loads for a base model: built-in name, unpacked archive, or folder."""
    if model_id in registered_models():
        return model_id
    row = session.get(RegisteredModel, model_id)
    if row is not None and row.storage_key and row.sha256:
        return str(local_model_folder(storage, storage_key=row.storage_key, sha256=row.sha256,
                                      cache_dir=cache_dir))
    if row is None or not row.local_path:
        raise LookupError(f"base model {model_id!r} has no weights available to this process")
    return row.local_path
