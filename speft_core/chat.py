"""Chat conversations as model inputs: one template, rendered the same in training and serving.

Decisions kept here once:
- The template is the base model's own `tokenizer.chat_template` where it has one, else
  DEFAULT_CHAT_TEMPLATE (a ChatML-like Jinja template, below). Either is applied through
  `tokenizer.apply_chat_template(chat_template=...)`, and the job records the one it used in
  the delta's `chat_template` metadata, so that serving passes it back here (`render_chat`).
- The text is rendered once and tokenised whole (no special tokens added: the template writes
  bos where it wants one). The supervised span of an assistant message runs from the end of
  the conversation before it rendered with the generation prompt to the end of the
  conversation rendered up to and including it: its content and whatever the template writes
  after it (end-of-turn marker, eos). A token is supervised when its first character lies in
  the span of an assistant message of weight 1; every other label is IGNORE_INDEX.
- A conversation longer than `max_length` tokens is dropped, never truncated (a cut
  conversation loses either its answer or the context the answer rests on); `tokenize_chat`
  returns the dropped lines so that the job counts them in an event. One whose text is beyond
  `max_length` × the longest token string is dropped before it is tokenised.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .data import IGNORE_INDEX, ChatExample, ChatMessage, char_bound, effective_max_length
from .errors import ConfigError, DatasetFormatError

if TYPE_CHECKING:  # transformers is only needed for the type
    from transformers import PreTrainedTokenizerBase

# <|role|>, a newline, the content, then (assistant only) eos; one message a line. The
# generation prompt is "<|assistant|>\n". bos/eos are the tokenizer's (nothing where it has none).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation: its text, token ids, and which tokens the loss covers."""

    text: str
    input_ids: list[int]
    assistant_mask: list[bool]  # True on tokens of assistant messages of weight 1

    @property
    def labels(self) -> list[int]:
        """`input_ids` with IGNORE_INDEX wherever `assistant_mask` is False."""
        return [t if m else IGNORE_INDEX for t, m in zip(self.input_ids, self.assistant_mask)]


@dataclass(frozen=True)
class ChatFeatures:
    """Tokenised conversations and the source lines of those dropped as longer than max_length."""

    features: list[dict[str, Any]]
    dropped_lines: list[int | None]


def chat_template_for(tokenizer: PreTrainedTokenizerBase) -> str:
    """The template a job on this tokenizer uses: its own `chat_template`, else the default."""
    own = getattr(tokenizer, "chat_template", None)
    return own if isinstance(own, str) and own.strip() else DEFAULT_CHAT_TEMPLATE


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    *,
    template: str | None = None,
    add_generation_prompt: bool = False,
) -> RenderedChat:
    """Render and tokenise a conversation with `template` (default: `chat_template_for`).

    Messages are ChatMessage items or mappings with `role`, `content` and optional `weight`.
    With `add_generation_prompt` the text ends where the next assistant message would begin
    (what serving sends to the model). DatasetFormatError when the template refuses the
    conversation or does not render it as growing prefixes.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("chat data needs a fast (Rust) tokenizer for its character offsets",
                          param="model")
    template = template or chat_template_for(tokenizer)
    turns = [_turn(message) for message in messages]
    plain = [{"role": role, "content": content} for role, content, _ in turns]
    text = _render(tokenizer, plain, template, add_generation_prompt)
    spans: list[tuple[int, int]] = []
    for index, (role, _, weight) in enumerate(turns):
        if role != "assistant" or not weight:
            continue
        before = _render(tokenizer, plain[:index], template, True) if index else ""
        through = _render(tokenizer, plain[: index + 1], template, False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DatasetFormatError(
                f"the chat template does not render messages[{index}] as an extension of the "
                "messages before it, so its tokens cannot be told apart", param="messages")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    mask = [any(start <= first < end for start, end in spans)
            for first, _ in encoded["offset_mapping"]]
    return RenderedChat(text=text, input_ids=ids, assistant_mask=mask)


def tokenize_chat(
    examples: Sequence[ChatExample],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    template: str | None = None,
) -> ChatFeatures:
    """Features (`input_ids`, `attention_mask`, `labels`) of the conversations that fit in
    `max_length` tokens; the others are dropped and their lines returned. DatasetFormatError
    (naming the line) when the template refuses a conversation, or when none fits."""
    max_length = effective_max_length(tokenizer, max_length)
    template = template or chat_template_for(tokenizer)
    bound = char_bound(tokenizer, max_length)
    features: list[dict[str, Any]] = []
    dropped: list[int | None] = []
    for example in examples:
        if sum(len(message.content) for message in example.messages) > bound:
            dropped.append(example.line)  # more characters than max_length tokens can hold
            continue
        try:
            rendered = render_chat(tokenizer, example.messages, template=template)
        except DatasetFormatError as err:
            raise DatasetFormatError(err.message, line=example.line, param="messages") from err
        if len(rendered.input_ids) > max_length:
            dropped.append(example.line)
            continue
        features.append({"input_ids": rendered.input_ids,
                         "attention_mask": [1] * len(rendered.input_ids),
                         "labels": rendered.labels})
    if not features:
        raise DatasetFormatError(
            f"no conversation fits within max_length={max_length} tokens; raise max_length "
            "or shorten the conversations", param="max_length")
    return ChatFeatures(features=features, dropped_lines=dropped)


@dataclass(frozen=True)
class TurnEnd:
    """What a template writes after an assistant message's content, as generation stops on it:
    a special or added token (`token_ids`, e.g. `<|eot_id|>`, or eos for the default template;
    decoding skips those, so they are stopped on by id) or plain text (`text`, a stop string)."""

    token_ids: tuple[int, ...] = ()
    text: str = ""


_PROBE = "Hello"  # the assistant content rendered to find what follows it


def turn_end(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> TurnEnd:
    """The end-of-turn marker of `template` (default: `chat_template_for`): render a one-message
    conversation with the generation prompt, then with an assistant reply, and take what follows
    the reply (surrounding whitespace dropped). Empty where the template writes nothing after
    it or cannot render such a conversation."""
    template = template or chat_template_for(tokenizer)
    user = [{"role": "user", "content": "Hi"}]
    try:
        before = _render(tokenizer, user, template, True)
        through = _render(tokenizer, [*user, {"role": "assistant", "content": _PROBE}],
                          template, False)
    except DatasetFormatError:
        return TurnEnd()
    if not through.startswith(before + _PROBE):
        return TurnEnd()
    marker = through[len(before) + len(_PROBE):].strip()
    if not marker:
        return TurnEnd()
    if marker in tokenizer.get_added_vocab() or marker in tokenizer.all_special_tokens:
        return TurnEnd(token_ids=(int(tokenizer.convert_tokens_to_ids(marker)),))
    return TurnEnd(text=marker)  # plain text: decoded like any other, so a stop string


def _turn(message: ChatMessage | Mapping[str, Any]) -> tuple[str, str, int]:
    if isinstance(message, ChatMessage):
        return message.role, message.content, message.weight
    return str(message["role"]), str(message["content"]), int(message.get("weight", 1))


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], template: str,
            add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja's TemplateError, raise_exception(...) in the template
        raise DatasetFormatError(f"the chat template refused the conversation: {err}",
                                 param="messages") from err
    return str(text)
