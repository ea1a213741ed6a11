"""`/v1/models`: the registered base models."""
from __future__ import annotations

from fastapi import APIRouter

from api.deps import SessionDep, SessionRoute, TenantDep
from api.errors import COMMON_ERRORS, error_responses
from api.schemas.models import ModelList, ModelObject
from api.services import models

router = APIRouter(prefix="/models", tags=["models"],
                   responses=error_responses(*COMMON_ERRORS),
                   route_class=SessionRoute)


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, _: TenantDep) -> ModelList:
    """All base models."""
    return ModelList(data=[ModelObject.model_validate(row) for row in models.list_models(session)])


@router.get("/{model_id}", response_model=ModelObject, responses=error_responses(404))
def get_model(model_id: str, session: SessionDep, _: TenantDep) -> ModelObject:
    """One base model."""
    return ModelObject.model_validate(models.get_model(session, model_id=model_id))
