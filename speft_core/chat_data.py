"""Chat rows: OpenAI's supervised chat fine-tuning format, read as is and validated strictly.

A row is `{"messages": [...], "tools"?: [...], "parallel_tool_calls"?: bool, "functions"?: [...]}`
(OpenAI's `FineTuneChatRequestInput`). Decisions kept here once (rendering: speft_core/chat.py):
- Every field is either used or refused: a key of a row, message, tool, tool call or content
  part not listed here is refused naming it (ROW_FIELDS, ROLE_FIELDS), never ignored.
- Roles: system, developer, user, assistant, tool, and the legacy function. `content` is a string
  or a non-empty array of `{"type": "text", "text"}` parts, joined as one string (no separator,
  as transformers' templates join parts); other parts (images, audio, files, refusals) are
  refused: speft trains text models. System, developer and user content is non-empty; an
  assistant's may be null, absent or empty beside tool calls, and is non-empty otherwise; a tool
  result may be empty. `name` (a participant, FUNCTION_NAME's pattern) on system, developer, user
  and assistant messages; `weight` (0 or 1, default 1) on assistant messages only.
- `tools`: a non-empty array of at most MAX_TOOLS `{"type": "function", "function": {"name",
  "description"?, "parameters"?, "strict"?}}`, names distinct. An assistant's `tool_calls`: a
  non-empty array of `{"id", "type": "function", "function": {"name", "arguments"}}`; ids are
  distinct in the conversation; a called name is one of the row's tools where the row declares
  any; `arguments` is a string holding a JSON object (templates receive it parsed, the form
  transformers' templates expect).
- A tool message (`tool_call_id`) answers a call of the assistant message before it, each call
  once, and the answers follow that message directly; a call may stay unanswered only at the end
  of the conversation (the example then teaches the call). Templates see a tool message with the
  name of the function it answers (speft_core/chat.py).
- `parallel_tool_calls` (a boolean): false allows at most one call per assistant message; the
  template receives it as a variable of that name.
- Legacy fields are read as their tools equivalents: `functions` (function objects) as `tools`,
  an assistant's `function_call` `{"name", "arguments"}` as one tool call (without an id), and a
  `function` message (`name`, `content`, which may be null) as the tool message answering the
  pending call of that name. A row uses the tools fields or the legacy ones, not both.
- A conversation starts with a system, developer or user message and has an assistant message
  of weight 1 (the loss covers those, their tool calls included).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import DatasetFormatError
from .jsonl import check_encodable, is_int, json_type, loads_json

MAX_TOOLS = 128  # functions a row may declare (OpenAI's limit)
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # function and participant names
ROW_FIELDS = ("messages", "tools", "parallel_tool_calls", "functions")
ROLE_FIELDS: dict[str, tuple[str, ...]] = {
    "system": ("role", "content", "name"),
    "developer": ("role", "content", "name"),
    "user": ("role", "content", "name"),
    "assistant": ("role", "content", "name", "weight", "tool_calls", "function_call"),
    "tool": ("role", "content", "tool_call_id"),
    "function": ("role", "content", "name"),
}
CHAT_ROLES = tuple(ROLE_FIELDS)
_FUNCTION_FIELDS = ("name", "description", "parameters", "strict")
_LEGACY = ("functions", "function_call", "function messages")
_MODERN = ("tools", "tool_calls", "tool messages")


@dataclass(frozen=True)
class ToolCall:
    """One function call of an assistant message."""

    name: str
    arguments: str  # a JSON object, as the text the row holds
    id: str | None = None  # None for a legacy function_call


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat row; `weight` 1 puts an assistant message under the loss."""

    role: str  # system, developer, user, assistant or tool (a legacy function message: tool)
    content: str
    weight: int = 1
    name: str | None = None  # the participant (a legacy function message: the function)
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class ChatExample:
    """One chat row (causal_lm): a conversation whose weight-1 assistant messages are learned."""

    messages: tuple[ChatMessage, ...]
    line: int | None = field(default=None, compare=False)  # 1-based source line, for error messages
    tools: tuple[dict[str, Any], ...] = ()  # {"type": "function", "function": {...}} each
    parallel_tool_calls: bool | None = None


def parse_chat_row(row: dict[str, Any], line: int) -> ChatExample:
    """Validate one chat row; DatasetFormatError names the line and the field at fault."""
    _check_fields(row, ROW_FIELDS, "a chat row", line, prefix="")
    state = _Conversation(line)
    tools = state.read_tools(row)
    parallel = row.get("parallel_tool_calls")
    if "parallel_tool_calls" in row and not isinstance(parallel, bool):
        raise DatasetFormatError(f"'parallel_tool_calls' must be a boolean, got "
                                 f"{json_type(parallel)}", line=line, param="parallel_tool_calls")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "an empty array" if isinstance(messages, list) else json_type(messages)
        raise DatasetFormatError(f"'messages' must be a non-empty array, got {got}",
                                 line=line, param="messages")
    parsed = tuple(state.read_message(item, index) for index, item in enumerate(messages))
    if parsed[0].role not in ("system", "developer", "user"):
        raise DatasetFormatError(f"messages[0] is {_article(parsed[0].role)} message; a "
                                 "conversation starts with a system, developer or user message",
                                 line=line, param="messages[0]")
    if not any(message.role == "assistant" for message in parsed):
        raise DatasetFormatError("the conversation has no assistant message", line=line,
                                 param="messages")
    if not any(message.role == "assistant" and message.weight for message in parsed):
        raise DatasetFormatError("every assistant message has weight 0: nothing to learn",
                                 line=line, param="messages")
    if parallel is False:
        for index, message in enumerate(parsed):
            if len(message.tool_calls) > 1:
                raise DatasetFormatError(
                    f"messages[{index}] makes {len(message.tool_calls)} tool calls, but "
                    "parallel_tool_calls is false (at most one a message)",
                    line=line, param=f"messages[{index}].tool_calls")
    return ChatExample(messages=parsed, line=line, tools=tools, parallel_tool_calls=parallel)


class _Conversation:
    """The state of one row's validation: declared functions, pending and seen tool calls."""

    def __init__(self, line: int) -> None:
        self.line = line
        self.declared: set[str] | None = None  # function names of tools/functions, if declared
        self.kind: tuple[str, str] | None = None  # ("legacy"/"modern", the field that decided)
        self.call_ids: set[str] = set()
        self.pending: list[ToolCall] = []  # unanswered calls of the assistant message `caller`
        self.caller = -1

    def error(self, message: str, param: str) -> DatasetFormatError:
        return DatasetFormatError(message, line=self.line, param=param)

    def use(self, legacy: bool, name: str, where: str) -> None:
        """Record that the row uses a tools field (or a legacy one); refuse a mix of the two."""
        kind = "legacy" if legacy else "modern"
        if self.kind is not None and self.kind[0] != kind:
            raise self.error(
                f"{where} uses {name} in a row that uses {self.kind[1]}; a row uses tools, "
                "tool_calls and tool messages or the legacy functions, function_call and "
                "function messages, not both", where)
        self.kind = self.kind or (kind, name)

    def read_tools(self, row: dict[str, Any]) -> tuple[dict[str, Any], ...]:
        if "tools" in row and "functions" in row:
            raise self.error("give 'tools' or the legacy 'functions', not both", "functions")
        key = "tools" if "tools" in row else "functions" if "functions" in row else None
        if key is None:
            return ()
        self.use(key == "functions", key, key)
        items = row[key]
        if not isinstance(items, list) or not items or len(items) > MAX_TOOLS:
            got = (f"{len(items)} items" if isinstance(items, list) and items
                   else "an empty array" if isinstance(items, list) else json_type(items))
            raise self.error(f"'{key}' must be an array of 1 to {MAX_TOOLS} items "
                             "(leave it out when there are none), got " + got, key)
        tools = tuple(self.read_tool(item, f"{key}[{index}]", legacy=key == "functions")
                      for index, item in enumerate(items))
        names = [tool["function"]["name"] for tool in tools]
        for index, name in enumerate(names):
            if name in names[:index]:
                where = f"{key}[{index}]" + (".function" if key == "tools" else "")
                raise self.error(f"{where}.name {name!r} is declared twice", f"{where}.name")
        self.declared = set(names)
        return tools

    def read_tool(self, item: Any, where: str, *, legacy: bool) -> dict[str, Any]:
        if not legacy:
            self.object(item, where, ("type", "function"), required=("type", "function"),
                        kind="a tool")
            if item["type"] != "function":
                raise self.error(f"{where}.type must be 'function', got {_shown(item['type'])}",
                                 f"{where}.type")
            where, item = f"{where}.function", item["function"]
        self.object(item, where, _FUNCTION_FIELDS, required=("name",), kind="a function")
        self.function_name(item["name"], f"{where}.name")
        if "description" in item and not isinstance(item["description"], str):
            raise self.error(f"{where}.description must be a string, got "
                             f"{json_type(item['description'])}", f"{where}.description")
        if "parameters" in item and not isinstance(item["parameters"], dict):
            raise self.error(f"{where}.parameters must be a JSON Schema object, got "
                             f"{json_type(item['parameters'])}", f"{where}.parameters")
        if item.get("strict") is not None and not isinstance(item["strict"], bool):
            raise self.error(f"{where}.strict must be a boolean or null, got "
                             f"{json_type(item['strict'])}", f"{where}.strict")
        check_encodable(json.dumps(item, ensure_ascii=False), where, self.line)
        return {"type": "function", "function": dict(item)}

    def read_message(self, item: Any, index: int) -> ChatMessage:
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise self.error(f"{where} must be an object, got {json_type(item)}", where)
        role = item.get("role")
        if role not in ROLE_FIELDS:
            shown = repr(role) if isinstance(role, str) else json_type(role)
            raise self.error(f"{where}.role must be one of {', '.join(CHAT_ROLES)}; got {shown}"
                             if "role" in item else f"{where} has no 'role'", f"{where}.role")
        if "weight" in item and role != "assistant":
            raise self.error(f"{where}.weight is only allowed on assistant messages",
                             f"{where}.weight")
        self.object(item, where, ROLE_FIELDS[role], required=("role",),
                    kind=_article(f"{role} message"))
        if role not in ("tool", "function") and self.pending:
            self.unanswered(index)
        name = None
        if "name" in item:
            name = self.function_name(item["name"], f"{where}.name")
        if role in ("tool", "function"):
            return self.answer(item, where, role, name)
        if role != "assistant":
            return ChatMessage(role, self.content(item, where, may_be_empty=False), name=name)
        calls = self.calls(item, where)
        if calls:
            self.pending, self.caller = list(calls), index
        content = self.content(item, where, may_be_empty=bool(calls), optional=bool(calls))
        weight = item.get("weight", 1)
        if not is_int(weight) or weight not in (0, 1):
            shown = repr(weight) if is_int(weight) else json_type(weight)
            raise self.error(f"{where}.weight must be 0 or 1; got {shown}", f"{where}.weight")
        return ChatMessage("assistant", content, weight=weight, name=name, tool_calls=calls)

    def calls(self, item: dict[str, Any], where: str) -> tuple[ToolCall, ...]:
        if "tool_calls" in item and "function_call" in item:
            raise self.error(f"{where} gives tool_calls and the legacy function_call; give one",
                             f"{where}.function_call")
        if "function_call" in item:
            self.use(True, "function_call", f"{where}.function_call")
            return (self.call(item["function_call"], f"{where}.function_call", None),)
        if "tool_calls" not in item:
            return ()
        self.use(False, "tool_calls", f"{where}.tool_calls")
        calls = item["tool_calls"]
        if not isinstance(calls, list) or not calls:
            got = "an empty array" if isinstance(calls, list) else json_type(calls)
            raise self.error(f"{where}.tool_calls must be a non-empty array, got {got}",
                             f"{where}.tool_calls")
        parsed = []
        for number, call in enumerate(calls):
            at = f"{where}.tool_calls[{number}]"
            self.object(call, at, ("id", "type", "function"), required=("id", "type", "function"),
                        kind="a tool call")
            call_id = self.text(call["id"], f"{at}.id")
            if call_id in self.call_ids:
                raise self.error(f"{at}.id {call_id!r} is the id of an earlier tool call",
                                 f"{at}.id")
            self.call_ids.add(call_id)
            if call["type"] != "function":
                raise self.error(f"{at}.type must be 'function', got {_shown(call['type'])}",
                                 f"{at}.type")
            parsed.append(self.call(call["function"], f"{at}.function", call_id))
        return tuple(parsed)

    def call(self, value: Any, where: str, call_id: str | None) -> ToolCall:
        self.object(value, where, ("name", "arguments"), required=("name", "arguments"),
                    kind="a function call")
        name = self.function_name(value["name"], f"{where}.name")
        if self.declared is not None and name not in self.declared:
            raise self.error(f"{where}.name {name!r} is not one of the row's functions "
                             f"({', '.join(sorted(self.declared))})", f"{where}.name")
        arguments = value["arguments"]
        if not isinstance(arguments, str):
            raise self.error(f"{where}.arguments must be a string holding a JSON object, got "
                             f"{json_type(arguments)}", f"{where}.arguments")
        try:
            parsed = loads_json(arguments)
        except ValueError as err:
            raise self.error(f"{where}.arguments is not valid JSON ({err})",
                             f"{where}.arguments") from None
        if not isinstance(parsed, dict):
            raise self.error(f"{where}.arguments must hold a JSON object, got "
                             f"{json_type(parsed)}", f"{where}.arguments")
        check_encodable(arguments, f"{where}.arguments", self.line)
        return ToolCall(name=name, arguments=arguments, id=call_id)

    def answer(self, item: dict[str, Any], where: str, role: str, name: str | None) -> ChatMessage:
        """A tool (or legacy function) message: the pending call it answers, and its content."""
        legacy = role == "function"
        self.use(legacy, "function messages" if legacy else "tool messages", where)
        if legacy:
            if name is None:
                raise self.error(f"missing required field {where}.name", f"{where}.name")
            key, wanted = f"{where}.name", name
            found = [call for call in self.pending if call.id is None and call.name == name]
        else:
            if "tool_call_id" not in item:
                raise self.error(f"missing required field {where}.tool_call_id",
                                 f"{where}.tool_call_id")
            key, wanted = f"{where}.tool_call_id", self.text(item["tool_call_id"],
                                                             f"{where}.tool_call_id")
            found = [call for call in self.pending if call.id == wanted]
        if not found:
            calls = ", ".join(repr(call.name if legacy else call.id) for call in self.pending)
            before = (f"the pending calls of messages[{self.caller}] are {calls}" if calls
                      else "no tool call before it awaits an answer")
            raise self.error(f"{key} {wanted!r} answers no pending call ({before}); a {role} "
                             "message answers a call of the assistant message before it, once",
                             key)
        self.pending.remove(found[0])
        content = self.content(item, where, may_be_empty=True, nullable=legacy)
        return ChatMessage("tool", content, name=name, tool_call_id=found[0].id)

    def unanswered(self, index: int) -> None:
        shown = ", ".join(repr(call.id or call.name) for call in self.pending)
        raise self.error(f"messages[{self.caller}] makes tool calls that no tool message answers "
                         f"before messages[{index}]: {shown}", f"messages[{self.caller}]")

    def content(self, item: dict[str, Any], where: str, *, may_be_empty: bool,
                optional: bool = False, nullable: bool = False) -> str:
        """A message's content as one string (text parts joined); an `optional` one may be
        absent or null, a `nullable` one null ("" then)."""
        at = f"{where}.content"
        if "content" not in item:
            if optional:
                return ""
            raise self.error(f"missing required field {at}", at)
        value = item["content"]
        if value is None and (optional or nullable):
            return ""
        if isinstance(value, list) and value:
            text = "".join(self.text_part(part, f"{at}[{number}]")
                           for number, part in enumerate(value))
        elif isinstance(value, str):
            text = value
        else:
            got = "an empty array" if isinstance(value, list) else json_type(value)
            raise self.error(f"{at} must be a string or an array of text parts, got {got}", at)
        if not may_be_empty and not text.strip():
            raise self.error(f"{at} must not be empty", at)
        check_encodable(text, at, self.line)
        return text

    def text_part(self, part: Any, where: str) -> str:
        if isinstance(part, dict) and part.get("type") != "text" and "type" in part:
            raise self.error(f"{where}.type is {_shown(part['type'])}: only text parts are "
                             "accepted (speft trains text models)", f"{where}.type")
        self.object(part, where, ("type", "text"), required=("type", "text"), kind="a text part")
        if not isinstance(part["text"], str):
            raise self.error(f"{where}.text must be a string, got {json_type(part['text'])}",
                             f"{where}.text")
        return part["text"]

    def function_name(self, value: Any, where: str) -> str:
        name = self.text(value, where)
        if not FUNCTION_NAME.fullmatch(name):
            raise self.error(f"{where} must be 1 to 64 letters, digits, '_' or '-'; got "
                             f"{name[:80]!r}", where)
        return name

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            got = "an empty string" if isinstance(value, str) else json_type(value)
            raise self.error(f"{where} must be a non-empty string, got {got}", where)
        check_encodable(value, where, self.line)
        return value

    def object(self, value: Any, where: str, allowed: tuple[str, ...], *,
               required: tuple[str, ...], kind: str) -> None:
        """Refuse a `value` that is not an object, has a key outside `allowed` (`kind`, e.g. 'a
        tool call', names what takes them) or lacks a `required` one."""
        if not isinstance(value, dict):
            raise self.error(f"{where} must be an object, got {json_type(value)}", where)
        _check_fields(value, allowed, kind, self.line, prefix=f"{where}.")
        for key in required:
            if key not in value:
                raise self.error(f"missing required field {where}.{key}", f"{where}.{key}")


def _check_fields(value: dict[str, Any], allowed: tuple[str, ...], kind: str, line: int, *,
                  prefix: str) -> None:
    unknown = [key for key in value if key not in allowed]
    if unknown:
        raise DatasetFormatError(
            f"unknown field {prefix}{unknown[0]}: {kind} takes {', '.join(allowed)}",
            line=line, param=f"{prefix}{unknown[0]}")


def _article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json_type(value)
