"""JSONL datasets (DESIGN.md §4): validation with line numbers, tokenisation, padding, batching.

Decisions kept here once:
- Lines are numbered from 1, blank lines included; blank lines are skipped; a UTF-8 BOM is
  allowed at the very start of the file only; unknown keys in an object are ignored. A line
  is refused (naming it) when it is not UTF-8, not JSON (including JSON nested deeper than the
  parser's recursion limit, or an integer beyond Python's digit limit) or not an object, and
  when a text or label holds a lone surrogate (`"\\ud800"`: it cannot be encoded again).
- The task of a file is told by its first object (`detect_task`): `label` is classification;
  `prompt`, `completion` or `text` without `label` is causal_lm. The upload validator and the
  training reader read lines through the same code (`parse_dataset`, `parse_jsonl_lines`).
- Classification labels are strings or integers of at most MAX_LABEL_LENGTH characters, at
  most MAX_LABELS distinct ones a file; the label set is kept as strings (`str(label)`),
  sorted numerically when every label in the file is an integer, lexicographically otherwise.
- Texts are cut before tokenisation to a character bound that holds `max_length` tokens
  (`max_length` × the longest token string of the vocabulary; causal LM prompts keep their
  end), so a huge text costs no more than a long one; a cut text that then fills fewer
  tokens than it needs is tokenised again whole, so the tokens kept are those of the whole
  text (for text whose kept tokens lie within the bound: any ordinary text).
- Causal LM rows are `{"prompt", "completion"}` (loss on the completion only) or `{"text"}`
  (read as an empty prompt and the whole text as the completion); `text` and `completion`
  must be non-empty, `prompt` may be empty.
- Chat rows (causal_lm too) are `{"messages": [{"role", "content", "weight"?}, ...]}` in
  OpenAI's chat fine-tuning format: roles system, user, assistant; content a non-empty string;
  `weight` (0 or 1, default 1) only on assistant messages. A conversation starts with a system
  or user message and has at least one assistant message of weight 1 (the loss covers those).
  A file is either all chat rows or none (tokenisation and the template: speft_core/chat.py).
- Causal LM sequences are `[bos] + prompt + completion + [eos]` (bos/eos where the tokenizer has
  them), truncated on the right; when that would leave no completion token, the prompt is cut on
  the left instead so that at least one completion token stays. A truncated completion loses its
  eos (the text goes on). Examples left with no supervised token are kept (zero loss); only a
  dataset in which *no* example keeps one is an error.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from .config import TASKS
from .errors import ConfigError, DatasetFormatError

if TYPE_CHECKING:  # transformers is only needed for the type
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value the loss skips (prompt, bos and padding positions)
MAX_LABELS = 1000  # distinct classification labels a file may hold
MAX_LABEL_LENGTH = 256  # characters of one label (`str(label)` for integers)
_BOM = "\ufeff"
_SURROGATE = re.compile("[\ud800-\udfff]")
_PAD_VALUES: dict[str, int] = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}


@dataclass(frozen=True)
class ClassificationExample:
    """One classification row: a text (and optional second text) with its label."""

    text: str
    label: str | int
    text_pair: str | None = None
    line: int | None = field(default=None, compare=False)  # 1-based source line, for error messages


@dataclass(frozen=True)
class CausalLMExample:
    """One causal-LM row: the loss covers the completion only (`{"text": t}` has prompt="")."""

    prompt: str
    completion: str
    line: int | None = field(default=None, compare=False)  # 1-based source line, for error messages


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat row; `weight` 1 puts an assistant message under the loss."""

    role: str
    content: str
    weight: int = 1


@dataclass(frozen=True)
class ChatExample:
    """One chat row (causal_lm): a conversation whose weight-1 assistant messages are learned."""

    messages: tuple[ChatMessage, ...]
    line: int | None = field(default=None, compare=False)  # 1-based source line, for error messages


Example = ClassificationExample | CausalLMExample | ChatExample
Rows = list[ClassificationExample] | list[CausalLMExample] | list[ChatExample]
CHAT_ROLES = ("system", "user", "assistant")


def read_jsonl(
    path: str | os.PathLike[str], task: str, *, max_examples: int | None = None
) -> Rows:
    """Read and validate a JSONL dataset file for `task`; stops after `max_examples` examples."""
    with open(path, "rb") as handle:
        return parse_jsonl_lines(handle, task, max_examples=max_examples)


def parse_jsonl_lines(
    lines: Iterable[bytes | str], task: str, *, max_examples: int | None = None
) -> Rows:
    """Validate JSONL lines (one item a line) for `task`; DatasetFormatError names the bad line.

    Lines after the `max_examples`-th example are not read (nor validated).
    """
    _check_task(task)
    if max_examples is not None and (not _is_int(max_examples) or max_examples < 1):
        raise ConfigError("max_examples must be a positive integer or None", param="max_examples")
    return _parse_rows(_json_objects(lines), task, max_examples)


def parse_dataset(
    lines: Iterable[bytes | str],
) -> tuple[str, Rows]:
    """Tell the task from the first object and validate every line for it: (task, examples)."""
    objects = _json_objects(lines)
    first = next(objects, None)
    if first is None:
        raise DatasetFormatError("the file contains no examples")
    task = detect_task(first[1])
    if task is None:
        raise DatasetFormatError(
            "cannot tell the task: give 'text' and 'label' (classification), "
            "'prompt' and 'completion', 'text' or 'messages' (causal_lm)", line=first[0],
        )
    return task, _parse_rows(itertools.chain([first], objects), task, None)


def detect_task(row: object) -> str | None:
    """The task a row is written for: classification (`label`) or causal_lm (`prompt`,
    `completion`, `text` or chat `messages`); None if neither."""
    if not isinstance(row, dict):
        return None
    if "label" in row:
        return "classification"
    if {"prompt", "completion", "text", "messages"} & row.keys():
        return "causal_lm"
    return None


def label_set(examples: Sequence[ClassificationExample]) -> list[str]:
    """Distinct labels as strings: numeric order if all labels are ints, else lexicographic."""
    raw = {example.label for example in examples}
    if all(_is_int(label) for label in raw):
        return [str(label) for label in sorted({int(label) for label in raw})]
    return sorted({str(label) for label in raw})


def tokenize(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    *,
    max_length: int,
    label2id: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Turn examples into model features (`input_ids`, `attention_mask`, ..., `labels`) for `task`.

    Classification: `labels` is the class id (label2id defaults to `label_set(examples)` order);
    a label missing from `label2id` raises DatasetFormatError naming it. Causal LM: `labels` is a
    list, IGNORE_INDEX on bos and prompt positions. `max_length` is capped at the tokenizer's
    `model_max_length`.
    """
    _check_task(task)
    max_length = effective_max_length(tokenizer, max_length)
    if not examples:
        raise DatasetFormatError("the dataset contains no examples")
    expected = ClassificationExample if task == "classification" else CausalLMExample
    if not all(isinstance(example, expected) for example in examples):
        raise TypeError(f"tokenize(task={task!r}) needs {expected.__name__} items")
    if task == "classification":
        rows = cast("Sequence[ClassificationExample]", examples)
        return _tokenize_classification(rows, tokenizer, max_length, label2id)
    return _tokenize_causal_lm(cast("Sequence[CausalLMExample]", examples), tokenizer, max_length)


def effective_max_length(tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """`max_length` (a positive integer, else ConfigError) capped at the tokenizer's
    `model_max_length`."""
    if not _is_int(max_length) or max_length < 1:
        raise ConfigError(
            f"max_length must be a positive integer; got {max_length!r}", param="max_length"
        )
    return min(max_length, int(getattr(tokenizer, "model_max_length", max_length) or max_length))


def collate(features: Sequence[Mapping[str, Any]], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad features into tensors: ids with `pad_token_id`, masks with 0, label lists -100."""
    if not features:
        raise ValueError("collate needs at least one feature")
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        column = [feature[key] for feature in features]
        if key == "labels" and all(_is_int(value) for value in column):
            batch[key] = torch.tensor(column, dtype=torch.long)
            continue
        if key == "input_ids":
            pad = pad_token_id
        elif key in _PAD_VALUES:
            pad = _PAD_VALUES[key]
        else:
            raise ValueError(f"collate does not know how to pad feature {key!r}")
        width = max(len(values) for values in column)
        padded = torch.full((len(column), width), pad, dtype=torch.long)
        for row, values in enumerate(column):
            padded[row, : len(values)] = torch.as_tensor(values, dtype=torch.long)
        batch[key] = padded
    return batch


def batches(
    features: Sequence[Mapping[str, Any]],
    batch_size: int,
    *,
    pad_token_id: int,
    shuffle: bool,
    seed: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded batches (the last one may be smaller); the order depends only on `seed`."""
    if not _is_int(batch_size) or batch_size < 1:
        raise ConfigError(
            f"batch_size must be a positive integer; got {batch_size!r}", param="batch_size"
        )
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(features), generator=generator).tolist()
    else:
        order = list(range(len(features)))
    for start in range(0, len(order), batch_size):
        chunk = [features[i] for i in order[start : start + batch_size]]
        yield collate(chunk, pad_token_id=pad_token_id)


# --- row validation -----------------------------------------------------------------------------


def _json_objects(lines: Iterable[bytes | str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; the BOM rule and JSON errors live here."""
    for number, raw in enumerate(lines, start=1):
        text = _decode_line(raw, number)
        if number == 1:
            text = text.removeprefix(_BOM)
        if not text.strip():
            continue
        row = _load_json(text.rstrip("\r\n"), number)
        if not isinstance(row, dict):
            raise DatasetFormatError(f"expected a JSON object, got {_json_type(row)}", line=number)
        yield number, row


def _load_json(text: str, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if "\r" in text:  # CR is only whitespace in JSON: here it stands where a line break was
            raise DatasetFormatError(
                "invalid JSON: lines end in a carriage return alone (CR, old Mac style); "
                "end each line with LF or CRLF", line=line) from None
        raise DatasetFormatError(f"invalid JSON ({err.msg} at column {err.colno})", line=line)
    except RecursionError:
        raise DatasetFormatError("invalid JSON (nested too deeply)", line=line) from None
    except ValueError:  # an integer literal beyond the interpreter's digit limit
        raise DatasetFormatError(
            f"invalid JSON (an integer longer than {sys.get_int_max_str_digits()} digits)",
            line=line,
        ) from None


def _parse_rows(
    objects: Iterable[tuple[int, dict[str, Any]]], task: str, max_examples: int | None
) -> list[Any]:
    parse_row = _parse_classification if task == "classification" else _parse_causal_lm
    examples: list[Any] = []
    labels: set[str] = set()
    for number, row in objects:
        example = parse_row(row, number)
        if isinstance(example, ClassificationExample):
            _count_label(labels, example, number)
        elif examples and isinstance(example, ChatExample) != isinstance(examples[0], ChatExample):
            raise DatasetFormatError(
                "a file is either all chat rows ('messages') or none; the first example "
                f"(line {examples[0].line}) is {_row_kind(examples[0])}, this one is "
                f"{_row_kind(example)}", line=number, param="messages",
            )
        examples.append(example)
        if max_examples is not None and len(examples) >= max_examples:
            break
    if not examples:
        raise DatasetFormatError("the file contains no examples")
    return examples


def _row_kind(example: Example) -> str:
    return "a chat row" if isinstance(example, ChatExample) else "a prompt/completion or text row"


def _count_label(labels: set[str], example: ClassificationExample, line: int) -> None:
    label = str(example.label)
    if label not in labels and len(labels) >= MAX_LABELS:
        raise DatasetFormatError(
            f"label {label!r} is one more than the {MAX_LABELS} distinct labels a file may hold",
            line=line, param="label",
        )
    labels.add(label)


def _parse_classification(row: dict[str, Any], line: int) -> ClassificationExample:
    text = _required_str(row, "text", line, non_empty=True)
    if "label" not in row:
        raise DatasetFormatError("missing required field 'label'", line=line, param="label")
    label = row["label"]
    if not (isinstance(label, str) or _is_int(label)):
        raise DatasetFormatError(
            f"'label' must be a string or integer, got {_json_type(label)}",
            line=line,
            param="label",
        )
    if isinstance(label, str) and not label.strip():
        raise DatasetFormatError("'label' must not be empty", line=line, param="label")
    if isinstance(label, str):
        _check_encodable(label, "label", line)
    if len(str(label)) > MAX_LABEL_LENGTH:
        raise DatasetFormatError(
            f"'label' is longer than {MAX_LABEL_LENGTH} characters", line=line, param="label"
        )
    pair = row.get("text_pair")  # null counts as absent
    if pair is not None and not isinstance(pair, str):
        raise DatasetFormatError(
            f"'text_pair' must be a string, got {_json_type(pair)}", line=line, param="text_pair"
        )
    if pair is not None:
        _check_encodable(pair, "text_pair", line)
    return ClassificationExample(text=text, label=label, text_pair=pair, line=line)


def _parse_causal_lm(row: dict[str, Any], line: int) -> CausalLMExample | ChatExample:
    if "messages" in row:
        if {"prompt", "completion", "text"} & row.keys():
            raise DatasetFormatError(
                "use either 'messages' or 'prompt'/'completion'/'text', not both",
                line=line, param="messages",
            )
        return _parse_chat(row["messages"], line)
    if "text" in row:
        if "prompt" in row or "completion" in row:
            raise DatasetFormatError(
                "use either 'text' or 'prompt' and 'completion', not both", line=line, param="text"
            )
        return CausalLMExample(
            prompt="", completion=_required_str(row, "text", line, non_empty=True), line=line
        )
    if "prompt" not in row and "completion" not in row:
        raise DatasetFormatError(
            "missing required field: give 'text', or 'prompt' and 'completion'",
            line=line,
            param="text",
        )
    prompt = _required_str(row, "prompt", line, non_empty=False)
    completion = _required_str(row, "completion", line, non_empty=True)
    return CausalLMExample(prompt=prompt, completion=completion, line=line)


def _parse_chat(messages: Any, line: int) -> ChatExample:
    if not isinstance(messages, list) or not messages:
        got = "an empty array" if isinstance(messages, list) else _json_type(messages)
        raise DatasetFormatError(f"'messages' must be a non-empty array, got {got}",
                                 line=line, param="messages")
    parsed = tuple(_parse_message(item, f"messages[{index}]", line)
                   for index, item in enumerate(messages))
    if parsed[0].role == "assistant":
        raise DatasetFormatError("messages[0] is an assistant message; a conversation starts "
                                 "with a system or user message", line=line, param="messages[0]")
    if not any(message.role == "assistant" for message in parsed):
        raise DatasetFormatError("the conversation has no assistant message", line=line,
                                 param="messages")
    if not any(message.role == "assistant" and message.weight for message in parsed):
        raise DatasetFormatError("every assistant message has weight 0: nothing to learn",
                                 line=line, param="messages")
    return ChatExample(messages=parsed, line=line)


def _parse_message(item: Any, where: str, line: int) -> ChatMessage:
    if not isinstance(item, dict):
        raise DatasetFormatError(f"{where} must be an object, got {_json_type(item)}",
                                 line=line, param=where)
    role = item.get("role")
    if role not in CHAT_ROLES:
        shown = repr(role) if isinstance(role, str) else _json_type(role)
        raise DatasetFormatError(
            f"{where}.role must be one of {', '.join(CHAT_ROLES)}; got {shown}"
            if "role" in item else f"{where} has no 'role'", line=line, param=f"{where}.role")
    content = _required_str(item, "content", line, non_empty=True, where=f"{where}.content")
    weight = item.get("weight", 1)
    if "weight" in item and role != "assistant":
        raise DatasetFormatError(f"{where}.weight is only allowed on assistant messages",
                                 line=line, param=f"{where}.weight")
    if not _is_int(weight) or weight not in (0, 1):
        shown = repr(weight) if _is_int(weight) else _json_type(weight)
        raise DatasetFormatError(f"{where}.weight must be 0 or 1; got {shown}", line=line,
                                 param=f"{where}.weight")
    return ChatMessage(role=role, content=content, weight=weight)


def _required_str(row: dict[str, Any], name: str, line: int, *, non_empty: bool,
                  where: str | None = None) -> str:
    """row[name] as a string; errors name `where` (a path such as messages[2].content) or name."""
    where = where or name
    shown = f"{where!r}" if where == name else where
    if name not in row:
        raise DatasetFormatError(f"missing required field {shown}", line=line, param=where)
    value = row[name]
    if not isinstance(value, str):
        raise DatasetFormatError(
            f"{shown} must be a string, got {_json_type(value)}", line=line, param=where
        )
    if non_empty and not value.strip():
        raise DatasetFormatError(f"{shown} must not be empty", line=line, param=where)
    _check_encodable(value, where, line)
    return value


def _check_encodable(value: str, name: str, line: int) -> None:
    """Refuse a lone surrogate (JSON `"\\ud800"`): no UTF-8 encoder or tokenizer takes it."""
    found = _SURROGATE.search(value)
    if found is not None:
        raise DatasetFormatError(
            f"{name!r} holds a lone surrogate (\\u{ord(found.group()):04x} at character "
            f"{found.start()}); escape a character outside the BMP as a surrogate pair",
            line=line, param=name,
        )


def _decode_line(raw: bytes | str, line: int) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetFormatError(
            f"not valid UTF-8 (bad byte at offset {err.start} of the line)", line=line
        )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {task!r}", param="task")


# --- tokenisation -------------------------------------------------------------------------------

_FEATURE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def char_bound(tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """Characters that hold `max_length` tokens of ordinary text: no token covers more characters
    than the longest token string of the vocabulary (markers such as `##`, `Ġ` only add)."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return max_length * max(longest, 1)


def _encode_cut(
    tokenizer: PreTrainedTokenizerBase,
    columns: list[list[str]],
    *,
    bound: int,
    need: int,
    keep_end: bool = False,
    **options: Any,
) -> dict[str, list[list[int]]]:
    """`tokenizer(*columns, **options)` with every text first cut to `bound` characters (its
    start kept, or its end with `keep_end`). A row is encoded again from its whole texts when a
    cut text gives fewer than `need` tokens, or (pairs) when the one cut text gives no more
    tokens than the other text, which would change the side that pair truncation shortens."""
    cut = [[text[-bound:] if keep_end else text[:bound] for text in column] for column in columns]
    encoded = tokenizer(*cut, **options)
    features = {key: [list(row) for row in encoded[key]] for key in _FEATURE_KEYS
                if key in encoded}
    rows = [row for row in range(len(columns[0]))
            if any(len(column[row]) > bound for column in columns)]
    if not rows:
        return features
    counts = [[len(ids) for ids in tokenizer([column[row] for row in rows],
                                             add_special_tokens=False)["input_ids"]]
              for column in cut]
    redo = [row for position, row in enumerate(rows)
            if not _cut_keeps_tokens([len(column[row]) > bound for column in columns],
                                     [count[position] for count in counts], need)]
    if redo:
        again = tokenizer(*[[column[row] for row in redo] for column in columns], **options)
        for key, values in features.items():
            for position, row in enumerate(redo):
                values[row] = list(again[key][position])
    return features


def _cut_keeps_tokens(was_cut: list[bool], counts: list[int], need: int) -> bool:
    """Whether cut texts with these token counts truncate as their whole texts would."""
    if any(cut and count < need for cut, count in zip(was_cut, counts)):
        return False
    if len(counts) == 2 and was_cut.count(True) == 1:
        cut_side = was_cut.index(True)
        return counts[cut_side] > counts[1 - cut_side]
    return True


def _tokenize_classification(
    examples: Sequence[ClassificationExample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    label2id: Mapping[str, int] | None,
) -> list[dict[str, Any]]:
    if label2id is None:
        label2id = {label: i for i, label in enumerate(label_set(examples))}
    ids: list[int] = []
    for position, example in enumerate(examples, start=1):
        label = str(example.label)
        if label not in label2id:
            known = ", ".join(repr(name) for name in label2id)
            where = "" if example.line is not None else f"example {position}: "
            raise DatasetFormatError(
                f"{where}label {label!r} is not in the training labels ({known})",
                line=example.line,
                param="label",
            )
        ids.append(label2id[label])
    features: list[dict[str, Any]] = [{} for _ in examples]
    bound = char_bound(tokenizer, max_length)
    singles = [i for i, example in enumerate(examples) if example.text_pair is None]
    pairs = [i for i, example in enumerate(examples) if example.text_pair is not None]
    for group, with_pair in ((singles, False), (pairs, True)):
        if not group:
            continue
        columns = [[examples[i].text for i in group]]
        if with_pair:
            columns.append([cast(str, examples[i].text_pair) for i in group])
        encoded = _encode_cut(tokenizer, columns, bound=bound, need=max_length,
                              truncation=True, max_length=max_length)
        for row, index in enumerate(group):
            features[index] = {key: values[row] for key, values in encoded.items()}
            features[index]["labels"] = ids[index]
    return features


def _tokenize_causal_lm(
    examples: Sequence[CausalLMExample], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[dict[str, Any]]:
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bound = char_bound(tokenizer, max_length)
    # A prompt longer than max_length loses its start (its last tokens are kept); more than
    # max_length tokens are needed from a cut prompt, max_length from a cut completion.
    prompts = _encode_cut(tokenizer, [[e.prompt for e in examples]], bound=bound,
                          need=max_length + 1, keep_end=True,
                          add_special_tokens=False)["input_ids"]
    completions = _encode_cut(tokenizer, [[e.completion for e in examples]], bound=bound,
                              need=max_length, add_special_tokens=False)["input_ids"]
    features: list[dict[str, Any]] = []
    supervised_any = False
    for prompt, completion in zip(prompts, completions):
        prompt = list(prompt)
        body = list(completion) + tail
        room = max_length - len(head) - 1  # prompt tokens that still leave one completion token
        if len(head) + len(prompt) + len(body) > max_length and len(prompt) > room:
            prompt = prompt[len(prompt) - max(room, 0) :]
        input_ids = (head + prompt + body)[:max_length]
        masked = min(len(head) + len(prompt), len(input_ids))
        labels = [IGNORE_INDEX] * masked + input_ids[masked:]
        supervised_any = supervised_any or masked < len(input_ids)
        features.append(
            {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
        )
    if not supervised_any:
        raise DatasetFormatError(
            f"no example keeps a completion token within max_length={max_length}; "
            "raise max_length or shorten the prompts",
            param="max_length",
        )
    return features
