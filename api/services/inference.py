"""Inference: one serving engine per base model in this process, adapters resolved per tenant.

A request names a base model and an adapter choice (an id, several ids with weights, or none);
`model` may instead name one of the tenant's adapters (as OpenAI's `ft:` models do), which
stands for its base model with that adapter. `prepare_inference` checks them against the database (the tenant's live adapters, trained on
that model), then loads each adapter through the engine's cache (verified on first use) and
composes several into one. The engine batches and runs the request.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.core.models import Adapter, Checkpoint, RegisteredModel
from api.core.storage import ObjectNotFound, Storage, StorageUnavailable
from api.errors import ApiError, InvalidRequest, NotFound, ServiceUnavailable
from api.services import models, stored_objects
from speft_core.chat import TurnEnd, render_chat, turn_end
from speft_core.errors import ConfigError, DeltaFormatError, DeltaMismatchError, SpeftError
from speft_core.models import resolve_model
from speft_core.serving import (
    AdapterTooLargeError,
    CacheEntryInfo,
    ServingAdapter,
    ServingEngine,
    ServingObserver,
    ServingOptions,
)

log = logging.getLogger(__name__)


class AdapterUnservable(ApiError):
    """422: the adapter exists but cannot be served (corrupt file, another base, another task)."""

    status_code, code = 422, "adapter_invalid"


class ModelUnavailable(ServiceUnavailable):
    """503: the base model failed to load in this process; nothing of it was kept, so a retry
    loads it afresh."""

    code = "model_load_failed"


@dataclass(frozen=True)
class PreparedInference:
    """What a request runs on: the model's engine and its (composed) adapter, or None, and the
    chat template the (first) adapter was trained with, if it recorded one."""

    engine: ServingEngine
    adapter: ServingAdapter | None
    chat_template: str | None = None


class InferenceEngines:
    """This process's serving engines, one per base model, each loaded on first use."""

    def __init__(self, settings: Settings, storage: Callable[[], Storage],
                 observer: ServingObserver | None = None) -> None:
        self.settings, self._storage, self.observer = settings, storage, observer
        self._engines: dict[str, ServingEngine] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def engine(self, session: Session, model: RegisteredModel) -> ServingEngine:
        """The engine of a registered base model, loading its weights once: concurrent first
        callers wait for one load. Only a loaded engine is kept: a load that fails is
        ModelUnavailable (503) for the request that ran it, and the next one loads afresh."""
        engine = self._engines.get(model.id)
        if engine is not None:
            return engine
        with self._lock:
            lock = self._loading.setdefault(model.id, threading.Lock())
        with lock:
            if model.id not in self._engines:
                self._engines[model.id] = self._load_or_unavailable(session, model)
        return self._engines[model.id]

    def _load_or_unavailable(self, session: Session, model: RegisteredModel) -> ServingEngine:
        """`_load`, its failures as ModelUnavailable (an outage of the database or storage, or
        an ApiError, is answered as it is)."""
        try:
            return self._load(session, model)
        except (ApiError, StorageUnavailable, DBAPIError):
            raise
        except Exception as err:  # the detail (paths, storage keys) stays in the server's log
            log.error("serving: base model %s failed to load: %s: %s", model.id,
                      type(err).__name__, err, exc_info=not isinstance(err, SpeftError))
            raise ModelUnavailable(f"model {model.id!r} failed to load on this server; the "
                                   "request can be retried", param="model") from err

    def _load(self, session: Session, model: RegisteredModel) -> ServingEngine:
        reference = models.model_reference(session, storage=self._storage(), model_id=model.id,
                                           cache_dir=self.settings.model_cache_dir)
        path: Path = resolve_model(reference, model.task).path
        options = ServingOptions(
            cache_bytes=self.settings.adapter_cache_bytes,
            max_batch_size=self.settings.inference_max_batch_size,
            max_wait_ms=self.settings.inference_max_wait_ms, path=self.settings.inference_path)
        log.info("serving: loading base model %s from %s", model.id, path)
        return ServingEngine.load(path, model.task, name=model.id, options=options,
                                  observer=self.observer, device=self.settings.inference_device,
                                  dtype=model.dtype)

    def engines(self) -> dict[str, ServingEngine]:
        """The loaded engines by model id."""
        return dict(self._engines)

    def unload_adapter(self, adapter_id: str) -> None:
        """Drop an adapter from every engine's cache (after a delete)."""
        for engine in self.engines().values():
            engine.unload(adapter_id)

    def loaded(self) -> list[tuple[str, CacheEntryInfo]]:
        """(model id, entry) for every resident adapter."""
        return [(name, entry) for name, engine in self.engines().items()
                for entry in engine.loaded()]

    def close(self) -> None:
        """Stop every engine's batching thread."""
        for engine in self.engines().values():
            engine.close()


def prepare_inference(session: Session, *, engines: InferenceEngines, storage: Storage,
                      tenant_id: str, model_id: str, parts: Sequence[tuple[str, float]],
                      task: str) -> PreparedInference:
    """Check the model and the tenant's adapters, then load (or find resident) and compose them."""
    model, parts = _model_and_parts(session, tenant_id=tenant_id, model_id=model_id,
                                    parts=parts)
    if model.task != task:
        endpoint = "/v1/classifications" if model.task == "classification" else "/v1/completions"
        raise InvalidRequest(f"model {model_id!r} is a {model.task} model: use {endpoint}",
                             param="model")
    rows = servable_by_id(session, tenant_id=tenant_id,
                          object_ids=[adapter_id for adapter_id, _ in parts])
    for adapter_id, _ in parts:
        row = rows.get(adapter_id)
        if row is None:
            raise NotFound(f"no such adapter: {adapter_id}", param="adapter")
        if row.base_model != model.id:
            raise InvalidRequest(f"adapter {adapter_id} was trained on {row.base_model!r}, "
                                 f"not {model.id!r}", param="adapter")
    engine = engines.engine(session, model)
    session.commit()  # end the read transaction before any slow load
    param = "adapter" if model.id == model_id else "model"
    loaded = [(_load_live_adapter(session, engine, storage, rows[adapter_id],
                                  tenant_id=tenant_id, param=param), weight)
              for adapter_id, weight in parts]
    if not loaded:
        return PreparedInference(engine, None)
    template = loaded[0][0].metadata.get("chat_template") or None
    if len(loaded) == 1 and loaded[0][1] == 1.0:
        return PreparedInference(engine, loaded[0][0], template)
    return PreparedInference(engine, engine.compose(loaded), template)


def _load_live_adapter(session: Session, engine: ServingEngine, storage: Storage,
                       row: Adapter | Checkpoint, *, tenant_id: str, param: str) -> ServingAdapter:
    """`load_adapter`, where an adapter deleted since it was looked up (its file purged under
    the load) is NotFound naming `param`, as it would have been a moment earlier."""
    try:
        return load_adapter(engine, storage, row)
    except AdapterUnservable:
        if row.id not in servable_by_id(session, tenant_id=tenant_id, object_ids=[row.id]):
            raise NotFound(f"no such adapter: {row.id}", param=param) from None
        raise


def servable_by_id(session: Session, *, tenant_id: str,
                   object_ids: Sequence[str]) -> dict[str, Adapter | Checkpoint]:
    """The tenant's live adapters and checkpoints among `object_ids` (both serve alike: a
    delta file with its sha256 and base model), by id."""
    return {**stored_objects.live_by_id(session, Adapter, tenant_id=tenant_id,
                                        object_ids=object_ids),
            **stored_objects.live_by_id(session, Checkpoint, tenant_id=tenant_id,
                                        object_ids=object_ids)}


def _model_and_parts(session: Session, *, tenant_id: str, model_id: str,
                     parts: Sequence[tuple[str, float]],
                     ) -> tuple[RegisteredModel, Sequence[tuple[str, float]]]:
    """The base model a request runs on and its adapter parts: `model` is a registered model,
    or one of the tenant's live adapters (then `adapter` must be left null)."""
    model = session.get(RegisteredModel, model_id)
    if model is not None:
        return model, parts
    named = servable_by_id(session, tenant_id=tenant_id, object_ids=[model_id]).get(model_id)
    if named is None:
        raise NotFound(f"no such model: {model_id}", param="model")
    if parts:
        raise InvalidRequest(f"model names adapter {model_id}: leave adapter null, or name the "
                             "base model in model", param="adapter")
    return models.get_model(session, model_id=named.base_model), [(model_id, 1.0)]


def chat_prompt_ids(prepared: PreparedInference, messages: Sequence[dict[str, str]]) -> list[int]:
    """A conversation as the model reads it, ending in the assistant's generation prompt: the
    template is the adapter's recorded one, else the tokenizer's own, else the default
    (`speft_core.chat`). ConfigError naming `messages` when it leaves no room to generate."""
    engine = prepared.engine
    ids = render_chat(engine.tokenizer, messages, template=prepared.chat_template,
                      add_generation_prompt=True).input_ids
    if len(ids) >= engine.max_positions:
        raise ConfigError(f"the conversation has {len(ids)} tokens: no room to generate "
                          f"within the model's {engine.max_positions} positions",
                          param="messages")
    return ids


def chat_turn_end(prepared: PreparedInference) -> TurnEnd:
    """Where a chat answer ends besides eos: the end-of-turn marker of the template the prompt
    is rendered with (`speft_core.chat.turn_end`), e.g. `<|eot_id|>` or `<|im_end|>`."""
    return turn_end(prepared.engine.tokenizer, prepared.chat_template)


def check_input_chars(texts: Sequence[str], *, limit: int, param: str,
                      listed: bool = False) -> None:
    """400 naming `param` for a text longer than `limit` characters
    (SPEFT_INFERENCE_MAX_INPUT_CHARS); `listed`: the texts came as a list (name the index)."""
    for index, text in enumerate(texts):
        if len(text) > limit:
            where = f"{param}[{index}]" if listed else param
            raise InvalidRequest(f"{where} has {len(text):,} characters, over the limit of "
                                 f"{limit:,} (SPEFT_INFERENCE_MAX_INPUT_CHARS)", param=param)


def load_adapter(engine: ServingEngine, storage: Storage, row: Adapter | Checkpoint,
                 *, pin: bool = False) -> ServingAdapter:
    """The adapter resident in the engine, loaded from storage and verified on a miss."""
    try:
        return engine.adapter(row.id, lambda: storage.get(row.storage_key), sha256=row.sha256,
                              pin=pin)
    except (DeltaFormatError, DeltaMismatchError) as err:
        raise AdapterUnservable(f"adapter {row.id} cannot be served: {err.message}",
                                param="adapter") from err
    except ObjectNotFound as err:
        raise AdapterUnservable(f"adapter {row.id}: its delta file is missing from storage",
                                param="adapter") from err
    except AdapterTooLargeError as err:
        raise ServiceUnavailable(f"adapter {row.id} does not fit the adapter cache: "
                                 f"{err.message}") from err


def preload_adapters(session: Session, *, engines: InferenceEngines, storage: Storage,
                     adapter_ids: Sequence[str]) -> list[str]:
    """Load and pin the configured adapters (any tenant); log and skip those that fail."""
    rows = session.scalars(select(Adapter).where(Adapter.id.in_(adapter_ids),
                                                 Adapter.deleted_at.is_(None))).all()
    found = {row.id: row for row in rows}
    pinned = []
    for adapter_id in adapter_ids:
        row = found.get(adapter_id)
        if row is None:
            log.warning("serving: preload adapter %s: no such live adapter", adapter_id)
            continue
        try:
            model = models.get_model(session, model_id=row.base_model)
            load_adapter(engines.engine(session, model), storage, row, pin=True)
        except (ApiError, LookupError) as err:
            log.warning("serving: preload adapter %s failed: %s", adapter_id, err)
            continue
        pinned.append(adapter_id)
    return pinned
