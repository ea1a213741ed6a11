"""Inference with an adapter chosen per request: `/v1/classifications`, `/v1/completions` and
`/v1/chat/completions` (SSE when streaming; both through `_generate`), and
`GET /v1/adapters/loaded` (what this process holds in memory)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from api.core.models import Tenant, new_id
from api.deps import SessionDep, SessionRoute, StorageDep, TenantDep
from api.errors import COMMON_ERRORS, error_body, error_responses
from api.schemas.inference import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionCreate,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    ClassificationCreate,
    ClassificationResponse,
    ClassificationResult,
    CompletionChoice,
    CompletionCreate,
    CompletionResponse,
    CompletionUsage,
    LoadedAdapter,
    LoadedAdapterList,
)
from api.services.inference import (
    InferenceEngines,
    PreparedInference,
    chat_prompt_ids,
    chat_turn_end,
    check_input_chars,
    prepare_inference,
    servable_by_id,
)
from speft_core.chat import TurnEnd
from speft_core.errors import SpeftError
from speft_core.serving import Completion, SamplingParams

router = APIRouter(tags=["inference"],
                   responses=error_responses(*COMMON_ERRORS),
                   route_class=SessionRoute)
_DONE = object()


def _engines(request: Request) -> InferenceEngines:
    return request.app.state.inference


async def _prepare(request: Request, session: Session, storage: Any, tenant: Tenant,
                   body: ClassificationCreate | CompletionCreate | ChatCompletionCreate,
                   task: str) -> PreparedInference:
    """Resolve model and adapters off the event loop (database, storage, cold loads), then
    release the session's connection: the request awaits the model without holding one."""

    def prepare_and_release() -> PreparedInference:
        try:
            return prepare_inference(
                session, engines=_engines(request), storage=storage, tenant_id=tenant.id,
                model_id=body.model, parts=body.adapter_parts(), task=task)
        finally:
            session.close()  # only rows were read: back to the pool before the model runs

    return await run_in_threadpool(prepare_and_release)


@router.post("/classifications", response_model=ClassificationResponse,
             responses=error_responses(404))
async def create_classification(body: ClassificationCreate, request: Request,
                                session: SessionDep, storage: StorageDep,
                                tenant: TenantDep) -> ClassificationResponse:
    """Label each input with the adapter's classes (probabilities of every label)."""
    check_input_chars(body.texts(), limit=_engines(request).settings.inference_max_input_chars,
                      param="input", listed=isinstance(body.input, list))
    prepared = await _prepare(request, session, storage, tenant, body, "classification")
    # tokenised off the event loop, on this request's thread (a bad text fails here, alone)
    queued = await run_in_threadpool(prepared.engine.classify, prepared.adapter, body.texts())
    results = await asyncio.wrap_future(queued)
    return ClassificationResponse(model=body.model, adapter=body.adapter, data=[
        ClassificationResult(index=i, label=r.label, probs=r.probs)
        for i, r in enumerate(results)])


@router.post("/completions", response_model=CompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}},
                        **error_responses(404)})
async def create_completion(body: CompletionCreate, request: Request, session: SessionDep,
                            storage: StorageDep, tenant: TenantDep) -> Any:
    """Continue the prompt; with `stream`, text arrives as server-sent events as it grows."""
    check_input_chars([body.prompt], limit=_engines(request).settings.inference_max_input_chars,
                      param="prompt")
    prepared = await _prepare(request, session, storage, tenant, body, "causal_lm")
    prompt_ids = await run_in_threadpool(prepared.engine.prompt_ids, body.prompt)
    completion_id, created = new_id("cmpl"), time.time()

    def response(text: str, finish: str | None, usage: CompletionUsage | None) -> CompletionResponse:
        return CompletionResponse(
            id=completion_id, created=created, model=body.model, adapter=body.adapter,
            choices=[CompletionChoice(text=text, finish_reason=finish)], usage=usage)

    return await _generate(
        prepared, prompt_ids, body,
        answer=lambda r: response(r.text, r.finish_reason, _usage(r)),
        piece=lambda text: response(text, None, None),
        last=lambda r: response("", r.finish_reason, _usage(r)))


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}},
                        **error_responses(404)})
async def create_chat_completion(body: ChatCompletionCreate, request: Request,
                                 session: SessionDep, storage: StorageDep,
                                 tenant: TenantDep) -> Any:
    """The assistant's next message; with `stream`, `chat.completion.chunk` server-sent events
    (the role first, then the content as it grows, then the finish reason and usage)."""
    check_input_chars(["".join(m.content for m in body.messages)],
                      limit=_engines(request).settings.inference_max_input_chars,
                      param="messages")
    prepared = await _prepare(request, session, storage, tenant, body, "causal_lm")
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    prompt_ids = await run_in_threadpool(chat_prompt_ids, prepared, messages)
    turn = await run_in_threadpool(chat_turn_end, prepared)
    completion_id, created = new_id("chatcmpl"), time.time()

    def chunk(delta: ChatDelta, finish: str | None = None,
              usage: CompletionUsage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=completion_id, created=created, model=body.model, adapter=body.adapter,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish)], usage=usage)

    return await _generate(
        prepared, prompt_ids, body, turn=turn,
        answer=lambda r: ChatCompletionResponse(
            id=completion_id, created=created, model=body.model, adapter=body.adapter,
            choices=[ChatChoice(message=ChatMessageOut(content=r.text),
                                finish_reason=r.finish_reason)], usage=_usage(r)),
        piece=lambda text: chunk(ChatDelta(content=text)),
        last=lambda r: chunk(ChatDelta(), r.finish_reason, _usage(r)),
        first=chunk(ChatDelta(role="assistant", content="")))


async def _generate(prepared: PreparedInference, prompt_ids: list[int],
                    body: CompletionCreate | ChatCompletionCreate, *,
                    answer: Callable[[Completion], BaseModel], piece: Callable[[str], BaseModel],
                    last: Callable[[Completion], BaseModel],
                    first: BaseModel | None = None, turn: TurnEnd | None = None) -> Any:
    """Run one generation: `answer(result)` when not streaming; else server-sent events:
    `first` (if any), `piece(text)` per new piece, then `last(result)` (or the error) and
    `[DONE]`. A client that stops reading stops its row at the next piece. `turn`: a chat
    template's end-of-turn marker, a stop besides eos and `stop`."""
    engine, turn = prepared.engine, turn or TurnEnd()
    stop = body.stop_strings() + ((turn.text,) if turn.text else ())
    params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature,
                            top_p=body.top_p, stop=stop, seed=body.seed,
                            stop_token_ids=turn.token_ids)
    if not body.stream:
        result: Completion = await asyncio.wrap_future(
            engine.complete(prepared.adapter, prompt_ids, params))
        return answer(result)

    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[Any] = asyncio.Queue()
    gone = threading.Event()

    def on_text(text: str) -> bool:
        if gone.is_set():
            return False
        loop.call_soon_threadsafe(pieces.put_nowait, text)
        return True

    future: Future = engine.complete(prepared.adapter, prompt_ids, params, on_text=on_text)
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, _DONE))

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield _sse(first.model_dump())
            while (text := await pieces.get()) is not _DONE:
                yield _sse(piece(text).model_dump())
        finally:
            gone.set()
        error = future.exception()
        if error is None:
            yield _sse(last(future.result()).model_dump())
        else:
            code, param = (error.code, error.param) if isinstance(error, SpeftError) else (
                "internal_error", None)
            yield _sse(error_body(code, str(error), param=param))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@router.get("/adapters/loaded", response_model=LoadedAdapterList)
def list_loaded_adapters(request: Request, session: SessionDep,
                         tenant: TenantDep) -> LoadedAdapterList:
    """The caller's adapters (and checkpoints served by id) resident in this API process, most
    recently used first."""
    engines = _engines(request)
    resident = engines.loaded()
    own = servable_by_id(session, tenant_id=tenant.id,
                         object_ids=[entry.key for _, entry in resident])
    loaded_engines = engines.engines().values()
    return LoadedAdapterList(
        data=[LoadedAdapter(id=entry.key, model=model, bytes=entry.nbytes, pinned=entry.pinned,
                            hits=entry.hits, load_ms=round(entry.load_seconds * 1000, 3),
                            loaded_at=entry.loaded_at, last_used_at=entry.last_used)
              for model, entry in resident if entry.key in own],
        resident_bytes=sum(e.cache.resident_bytes for e in loaded_engines),
        budget_bytes=sum(e.cache.budget_bytes for e in loaded_engines))


def _usage(result: Completion) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=result.prompt_tokens,
                           completion_tokens=result.completion_tokens,
                           total_tokens=result.prompt_tokens + result.completion_tokens)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
