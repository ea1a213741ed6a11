"""Inference schemas: classification, completion and chat requests and answers, resident adapters."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from api.errors import InvalidRequest
from api.schemas.common import StrictModel, UnixTime

MAX_CLASSIFICATION_INPUTS = 256
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256
MAX_SEED = 2**32 - 1  # as the training seed; larger integers lose precision in JSON clients
StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]
MAX_COMPOSED_ADAPTERS = 8
MAX_CHAT_MESSAGES = 256


class AdapterWeight(StrictModel):
    """One adapter of a composition and the weight its delta is added with."""

    id: str = Field(min_length=1, max_length=64)
    weight: float = Field(1.0, ge=-10.0, le=10.0, allow_inf_nan=False)


AdapterChoice = (str | Annotated[list[AdapterWeight],
                                  Field(min_length=1, max_length=MAX_COMPOSED_ADAPTERS)] | None)


class _InferenceRequest(StrictModel):
    model: str = Field(min_length=1, max_length=128)
    adapter: AdapterChoice = Field(
        None, description="An adapter id, a list of {id, weight} whose deltas are summed for "
                          "this request only, or null for the base model")

    def adapter_parts(self) -> list[tuple[str, float]]:
        """The adapter choice as (id, weight) pairs; empty for the base model. An adapter named
        twice is a 400 naming `adapter` (a rule no JSON schema can state)."""
        if self.adapter is None:
            return []
        if isinstance(self.adapter, str):
            return [(self.adapter, 1.0)]
        if len({part.id for part in self.adapter}) != len(self.adapter):
            raise InvalidRequest("an adapter appears twice in the composition", param="adapter")
        return [(part.id, part.weight) for part in self.adapter]


class ClassificationCreate(_InferenceRequest):
    """POST /v1/classifications: texts to label with a classification adapter."""

    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_CLASSIFICATION_INPUTS)
                           ] = Field(description="A text or a list of texts (at most "
                                                 f"{MAX_CLASSIFICATION_INPUTS}), each at most "
                                                 "SPEFT_INFERENCE_MAX_INPUT_CHARS characters "
                                                 "(100,000 by default; 400 beyond)")

    def texts(self) -> list[str]:
        """The input as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ClassificationResult(BaseModel):
    """One input's label and the probability of every label."""

    index: int
    label: str
    probs: dict[str, float]


class ClassificationResponse(BaseModel):
    """Labels for each input, in input order."""

    object: Literal["list"] = "list"
    model: str
    adapter: AdapterChoice
    data: list[ClassificationResult]


class _GenerationRequest(_InferenceRequest):
    """The sampling fields that `/v1/completions` and `/v1/chat/completions` share."""

    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = (
        Field(None, description=f"A stop string or up to {MAX_STOP_STRINGS}, each at most "
                                f"{MAX_STOP_LENGTH} characters"))
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings as a tuple (empty strings dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class CompletionCreate(_GenerationRequest):
    """POST /v1/completions: continue a prompt with a causal LM (SSE when `stream`)."""

    prompt: str = Field(description="At most SPEFT_INFERENCE_MAX_INPUT_CHARS characters "
                                    "(100,000 by default; 400 beyond)")


class ChatMessageIn(StrictModel):
    """One message of a chat request."""

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionCreate(_GenerationRequest):
    """POST /v1/chat/completions: the assistant's next message (SSE chunks when `stream`)."""

    messages: list[ChatMessageIn] = Field(
        min_length=1, max_length=MAX_CHAT_MESSAGES,
        description=f"1 to {MAX_CHAT_MESSAGES} messages, their contents together at most "
                    "SPEFT_INFERENCE_MAX_INPUT_CHARS characters (400 beyond)")


class CompletionChoice(BaseModel):
    """The generated text and why it ended (`stop` or `length`)."""

    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None


class CompletionUsage(BaseModel):
    """Token counts of the request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _GenerationAnswer(BaseModel):
    """What every completion answer and streamed chunk carries: its id, when, and the model and
    adapter choice as the request named them."""

    id: str
    created: UnixTime
    model: str
    adapter: AdapterChoice


class CompletionResponse(_GenerationAnswer):
    """A completion (also the shape of each streamed chunk, whose text is the new piece)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ChatMessageOut(BaseModel):
    """The assistant's message."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """The assistant's message and why it ended (`stop` or `length`)."""

    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(_GenerationAnswer):
    """A chat completion, in OpenAI's shape (plus the adapter choice)."""

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChatDelta(BaseModel):
    """What a streamed chunk adds to the message: the role (first chunk), then content."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """One streamed piece; the last chunk has an empty delta and the finish reason."""

    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(_GenerationAnswer):
    """One `chat.completion.chunk` server-sent event; the last carries `usage`."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None


class LoadedAdapter(BaseModel):
    """An adapter (or a checkpoint served by its id) resident in this API process's cache."""

    id: str
    model: str
    bytes: int
    pinned: bool
    hits: int
    load_ms: float
    loaded_at: UnixTime
    last_used_at: UnixTime


class LoadedAdapterList(BaseModel):
    """The caller's resident adapters and this process's cache totals."""

    object: Literal["list"] = "list"
    data: list[LoadedAdapter]
    resident_bytes: int
    budget_bytes: int
