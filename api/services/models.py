"""Base models: the built-in registry upserted into `base_models`, and reads of it."""
from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import safe_open
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.db import dialect_insert
from api.core.models import RegisteredModel, utcnow
from api.errors import NotFound
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


def register_builtin_models(session: Session) -> list[str]:
    """Upsert `speft_core.models.registered_models()` into base_models; return their ids."""
    sources = registered_models()
    for source in sources.values():
        values = {"task": source.task, "params": count_parameters(source.path),
                  "local_path": str(source.path)}
        statement = dialect_insert(session, RegisteredModel).values(
            id=source.name, created_at=utcnow(), **values
        )
        session.execute(statement.on_conflict_do_update(index_elements=["id"], set_=values))
    return list(sources)


def list_models(session: Session) -> list[RegisteredModel]:
    """All base models, by id."""
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.id)))


def get_model(session: Session, *, model_id: str) -> RegisteredModel:
    """The base model `model_id`; NotFound when it is not registered."""
    row = session.get(RegisteredModel, model_id)
    if row is None:
        raise NotFound(f"no such model: {model_id}", param="model")
    return row
