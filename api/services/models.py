"""Base models: the built-in registry upserted into `base_models`, and reads of it."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from safetensors import safe_open
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.db import dialect_insert
from api.core.models import RegisteredModel, utcnow
from api.errors import InvalidRequest, NotFound
from speft_core.config import TASKS
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


def _upsert_model(session: Session, *, model_id: str, task: str, path: Path) -> None:
    values = {"task": task, "params": count_parameters(path), "local_path": str(path)}
    statement = dialect_insert(session, RegisteredModel).values(
        id=model_id, created_at=utcnow(), **values
    )
    session.execute(statement.on_conflict_do_update(index_elements=["id"], set_=values))


def register_builtin_models(session: Session) -> list[str]:
    """Upsert `speft_core.models.registered_models()` into base_models; return their ids."""
    sources = registered_models()
    for source in sources.values():
        _upsert_model(session, model_id=source.name, task=source.task, path=source.path)
    return list(sources)


def register_local_model(session: Session, *, model_id: str, task: str, path: Path,
                         models_dir: Path | None) -> RegisteredModel:
    """Register a server-side HF model folder; it must lie inside `models_dir` (no escape)."""
    if not MODEL_ID_PATTERN.match(model_id):
        raise InvalidRequest("model ids are 1-128 letters, digits, '.', '_' or '-'", param="model")
    if task not in TASKS:
        raise InvalidRequest(f"task must be one of {', '.join(TASKS)}", param="task")
    if models_dir is None:
        raise InvalidRequest("set SPEFT_MODELS_DIR to the folder server-side models live in",
                             param="path")
    root = models_dir.expanduser().resolve()
    folder = (root / path).resolve() if not path.is_absolute() else path.resolve()
    if not folder.is_relative_to(root):
        raise InvalidRequest(f"{path} is outside SPEFT_MODELS_DIR ({root})", param="path")
    if not (folder / "config.json").is_file() or count_parameters(folder) == 0:
        raise InvalidRequest(f"{folder} is not a HF model folder with safetensors weights",
                             param="path")
    _upsert_model(session, model_id=model_id, task=task, path=folder)
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
