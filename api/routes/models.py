"""`/v1/models`: the registered base models."""
from __future__ import annotations

from fastapi import APIRouter

from api.core.models import RegisteredModel
from api.deps import SessionDep, TenantDep
from api.errors import COMMON_ERRORS, error_responses
from api.schemas import ModelList, ModelObject
from api.services import models

router = APIRouter(prefix="/models", tags=["models"], responses=error_responses(*COMMON_ERRORS))


def model_object(row: RegisteredModel) -> ModelObject:
    """The public view of a base model."""
    return ModelObject(id=row.id, task=row.task, params=row.params,
                       created_at=int(row.created_at.timestamp()))


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, _: TenantDep) -> ModelList:
    """All base models."""
    return ModelList(data=[model_object(row) for row in models.list_models(session)])


@router.get("/{model_id}", response_model=ModelObject, responses=error_responses(404))
def get_model(model_id: str, session: SessionDep, _: TenantDep) -> ModelObject:
    """One base model."""
    return model_object(models.get_model(session, model_id=model_id))
