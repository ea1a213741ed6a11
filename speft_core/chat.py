"""Chat conversations as model inputs: one template, rendered the same in training and serving.

Decisions kept here once (the rows themselves: speft_core/chat_data.py):
- The template is the base model's own `tokenizer.chat_template` where it has one, else
  DEFAULT_CHAT_TEMPLATE (a ChatML-like Jinja template, below). Either is applied through
  `tokenizer.apply_chat_template(chat_template=..., tools=...)`, and the job records the one it
  used in the delta's `chat_template` metadata, so that serving passes it back here
  (`render_chat`). Templates receive messages in transformers' shape: `role`, `content` (a
  string), and where present `name`, `tool_calls` (`{"id", "type": "function", "function":
  {"name", "arguments"}}`, arguments parsed into an object) and `tool_call_id`; the row's
  `tools` as `tools`, and `parallel_tool_calls` as a variable of that name.
- A job never drops a field silently: where the model's own template leaves out something the
  data uses (tools, tool calls, tool results, message names, developer messages: probed by
  rendering a marker in each, `unrendered_fields`), the job renders with DEFAULT_CHAT_TEMPLATE,
  which renders all of them, and says so in an event (`choose_chat_template`).
- The text is rendered once and tokenised whole (no special tokens added: the template writes
  bos where it wants one). The supervised span of an assistant message runs from the end of
  the conversation before it rendered with the generation prompt to the end of the
  conversation rendered up to and including it: its content, its tool calls and whatever the
  template writes after it (end-of-turn marker, eos). A token is supervised when its first
  character lies in the span of an assistant message of weight 1; every other label is
  IGNORE_INDEX.
- A conversation longer than the job's token limit (`lengths.effective_max_length`: max_length,
  or with 'auto' the model's context) is dropped, never truncated (a cut conversation loses
  either its answer or the context the answer rests on); `tokenize_chat` returns the dropped
  lines so that the job counts them in an event, and fails only when none fits. One whose
  content is beyond the limit × the longest token string is dropped before it is rendered.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .chat_data import ChatExample, ChatMessage, ToolCall
from .config import AUTO
from .data import IGNORE_INDEX
from .errors import ConfigError, DatasetFormatError
from .lengths import char_bound, effective_max_length

if TYPE_CHECKING:  # transformers is only needed for the type
    from transformers import PreTrainedTokenizerBase

# bos; the tools, if any: `<|tools|>` and one function's JSON a line; then per message
# `<|role|>` (`<|role name=NAME|>` with a name; a tool result carries the function's name), a
# newline, the content, each tool call on a line of its own as `<tool_call>{"name": ...,
# "arguments": {...}}</tool_call>`, eos after an assistant message, a newline. The generation
# prompt is "<|assistant|>\n". bos/eos are the tokenizer's (nothing where it has none). A plain
# chat (no tools, calls or names) renders as it did before tools were added.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% if tools %}{{ '<|tools|>\\n' }}{% for tool in tools %}"
    "{{ (tool['function'] if tool['function'] is defined else tool) | tojson }}{{ '\\n' }}"
    "{% endfor %}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] }}"
    "{% if message['name'] is defined %}{{ ' name=' + message['name'] }}{% endif %}"
    "{{ '|>\\n' + message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>' + {'name': call['function']['name'],"
    " 'arguments': call['function']['arguments']} | tojson + '</tool_call>' }}"
    "{% endfor %}"
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
    """Tokenised conversations, the source lines of those dropped as longer than the token
    limit, and that limit (`max_length` as resolved: 'auto' is the model's context)."""

    features: list[dict[str, Any]]
    dropped_lines: list[int | None]
    max_length: int


@dataclass(frozen=True)
class TemplateChoice:
    """The template a chat job renders with; `unrendered` names what the data uses that the
    model's own template leaves out (then `template` is DEFAULT_CHAT_TEMPLATE)."""

    template: str
    unrendered: tuple[str, ...] = ()


def chat_template_for(tokenizer: PreTrainedTokenizerBase) -> str:
    """The template of this tokenizer: its own `chat_template`, else the default."""
    own = getattr(tokenizer, "chat_template", None)
    return own if isinstance(own, str) and own.strip() else DEFAULT_CHAT_TEMPLATE


def choose_chat_template(tokenizer: PreTrainedTokenizerBase,
                         examples: Sequence[object]) -> TemplateChoice:
    """The template a job on these chat `examples` renders with: `chat_template_for`, unless
    the tokenizer's own template leaves out fields the examples use (then the default)."""
    template = chat_template_for(tokenizer)
    if template == DEFAULT_CHAT_TEMPLATE:
        return TemplateChoice(template)
    missing = unrendered_fields(tokenizer, template, examples)
    return TemplateChoice(DEFAULT_CHAT_TEMPLATE, missing) if missing else TemplateChoice(template)


# One probe a field: a conversation holding it, the tools beside it, and the marker that shows in
# the text when the template renders the field.
_USER, _REPLY = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}
_TOOL = {"type": "function", "function": {"name": "zqx_fn", "description": "d",
                                          "parameters": {"type": "object", "properties": {}}}}
_CALL = {"role": "assistant", "content": "", "tool_calls": [{
    "id": "zqxcall01", "type": "function", "function": {"name": "zqx_fn",
                                                        "arguments": {"zqx_arg": 1}}}]}
_PROBES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]] = {
    "tools": ([_USER, _REPLY], [_TOOL], "zqx_fn"),
    "tool_calls": ([_USER, _CALL], [_TOOL], "zqx_arg"),
    "tool messages": ([_USER, _CALL, {"role": "tool", "tool_call_id": "zqxcall01",
                                      "name": "zqx_fn", "content": "zqx_result"}, _REPLY],
                      [_TOOL], "zqx_result"),
    "name": ([{**_USER, "name": "zqx_name"}, _REPLY], None, "zqx_name"),
    "developer messages": ([{"role": "developer", "content": "zqx_dev"}, _USER, _REPLY], None,
                           "zqx_dev"),
}


def unrendered_fields(tokenizer: PreTrainedTokenizerBase, template: str,
                      examples: Sequence[object]) -> tuple[str, ...]:
    """The fields the chat `examples` use (tools, tool_calls, tool messages, name, developer
    messages) that `template` leaves out of its text or refuses."""
    used: set[str] = set()
    for example in examples:
        if not isinstance(example, ChatExample):
            continue
        used.update(["tools"] if example.tools else [])
        for message in example.messages:
            used.update(["tool_calls"] if message.tool_calls else [])
            used.update(["tool messages"] if message.role == "tool" else
                        ["name"] if message.name is not None else [])
            used.update(["developer messages"] if message.role == "developer" else [])
    missing = []
    for name, (messages, tools, marker) in _PROBES.items():
        if name not in used:
            continue
        try:
            text = _render(tokenizer, messages, template, False, {"tools": tools} if tools else {})
        except DatasetFormatError:
            text = ""
        if marker not in text:
            missing.append(name)
    return tuple(missing)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    *,
    template: str | None = None,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    parallel_tool_calls: bool | None = None,
) -> RenderedChat:
    """Render and tokenise a conversation with `template` (default: `chat_template_for`).

    Messages are ChatMessage items or mappings in OpenAI's shape (`role`, `content` a string,
    text parts or null, optional `weight`, `name`, `tool_calls`, `tool_call_id`); `tools` are
    OpenAI's `{"type": "function", "function": {...}}`. With `add_generation_prompt` the text
    ends where the next assistant message would begin (what serving sends to the model).
    DatasetFormatError when the template refuses the conversation or does not render it as
    growing prefixes.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("chat data needs a fast (Rust) tokenizer for its character offsets",
                          param="model")
    template = template or chat_template_for(tokenizer)
    turns = [message if isinstance(message, ChatMessage) else _as_message(message)
             for message in messages]
    plain = _template_messages(turns)
    options: dict[str, Any] = {"tools": [dict(tool) for tool in tools]} if tools else {}
    if parallel_tool_calls is not None:
        options["parallel_tool_calls"] = parallel_tool_calls
    text = _render(tokenizer, plain, template, add_generation_prompt, options)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(turns):
        if message.role != "assistant" or not message.weight:
            continue
        before = _render(tokenizer, plain[:index], template, True, options) if index else ""
        through = _render(tokenizer, plain[: index + 1], template, False, options)
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
    max_length: int | str = AUTO,
    template: str | None = None,
) -> ChatFeatures:
    """Features (`input_ids`, `attention_mask`, `labels`) of the conversations that fit in
    `effective_max_length(tokenizer, max_length)` tokens; the others are dropped and their lines
    returned. `template` defaults to `choose_chat_template`. DatasetFormatError (naming the
    line) when the template refuses a conversation, or when none fits."""
    limit = effective_max_length(tokenizer, max_length)
    template = template or choose_chat_template(tokenizer, examples).template
    bound = char_bound(tokenizer, limit)
    features: list[dict[str, Any]] = []
    dropped: list[int | None] = []
    for example in examples:
        if sum(len(message.content) for message in example.messages) > bound:
            dropped.append(example.line)  # more characters than `limit` tokens can hold
            continue
        try:
            rendered = render_chat(tokenizer, example.messages, template=template,
                                   tools=example.tools,
                                   parallel_tool_calls=example.parallel_tool_calls)
        except DatasetFormatError as err:
            raise DatasetFormatError(err.message, line=example.line, param="messages") from err
        if len(rendered.input_ids) > limit:
            dropped.append(example.line)
            continue
        features.append({"input_ids": rendered.input_ids,
                         "attention_mask": [1] * len(rendered.input_ids),
                         "labels": rendered.labels})
    if not features:
        raise DatasetFormatError(
            f"no conversation fits within {limit} tokens (max_length {max_length!r}, at most "
            "the model's context); shorten the conversations, or raise an explicit max_length "
            "that is below the context", param="max_length")
    return ChatFeatures(features=features, dropped_lines=dropped, max_length=limit)


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


def _as_message(message: Mapping[str, Any]) -> ChatMessage:
    """An OpenAI message mapping (serving's) as a ChatMessage, legacy function fields read as
    their tools equivalents; its shape only is taken (rows from files: chat_data validates)."""
    content = message.get("content")
    if isinstance(content, list):  # text parts
        content = "".join(str(part.get("text", "")) for part in content)
    calls = [(call.get("id"), call["function"]) for call in message.get("tool_calls") or ()]
    if message.get("function_call"):
        calls.append((None, message["function_call"]))
    return ChatMessage(
        role="tool" if message["role"] == "function" else str(message["role"]),
        content="" if content is None else str(content), weight=int(message.get("weight", 1)),
        name=message.get("name"), tool_call_id=message.get("tool_call_id"),
        tool_calls=tuple(ToolCall(name=str(function["name"]), id=call_id,
                                  arguments=function["arguments"]
                                  if isinstance(function["arguments"], str)
                                  else json.dumps(function["arguments"]))
                         for call_id, function in calls))


def _template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates read them (transformers' shape; only the keys each has); a
    tool message carries the name of the function whose call it answers."""
    called: dict[str, str] = {}  # call id -> function name
    shaped: list[dict[str, Any]] = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        name = message.name
        if message.role == "tool" and name is None:
            name = called.get(message.tool_call_id or "")
        if name is not None:
            item["name"] = name
        if message.tool_calls:
            called.update((call.id, call.name) for call in message.tool_calls if call.id)
            item["tool_calls"] = [
                {**({"id": call.id} if call.id is not None else {}), "type": "function",
                 "function": {"name": call.name, "arguments": _arguments(call.arguments)}}
                for call in message.tool_calls]
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        shaped.append(item)
    return shaped


def _arguments(text: str) -> Any:
    """A call's arguments as templates expect them: the JSON object parsed (rows are checked to
    hold one; a serving request's text that is not JSON is passed on as it is)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], template: str,
            add_generation_prompt: bool, options: Mapping[str, Any] | None = None) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **(options or {}))
    except Exception as err:  # jinja's TemplateError, raise_exception(...) in the template
        raise DatasetFormatError(f"the chat template refused the conversation: {err}",
                                 param="messages") from err
    return str(text)
