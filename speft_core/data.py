"""JSONL datasets (DESIGN.md §4): validation with line numbers, tokenisation, padding, batching.

Decisions kept here once (lines and fields: speft_core/jsonl.py; chat rows:
speft_core/chat_data.py; lengths and texts cut to them: speft_core/lengths.py):
- Unknown keys of a classification or prompt/completion row are ignored (a chat row refuses
  them); a text or label holding a lone surrogate is refused.
- The task of a file is told by its first object (`detect_task`): `label` is classification;
  `prompt`, `completion`, `text` or `messages` without `label` is causal_lm. The upload
  validator and the training reader read lines through the same code (`parse_dataset`,
  `parse_jsonl_lines`).
- Classification labels are strings or integers of at most MAX_LABEL_LENGTH characters, at
  most MAX_LABELS distinct ones a file; the label set is kept as strings (`str(label)`),
  sorted numerically when every label in the file is an integer, lexicographically otherwise.
- Causal LM rows are `{"prompt", "completion"}` (loss on the completion only) or `{"text"}`
  (read as an empty prompt and the whole text as the completion); `text` and `completion`
  must be non-empty, `prompt` may be empty. Chat rows (`{"messages": ...}`, OpenAI's format)
  are causal_lm too; a file is either all chat rows or none (tokenisation: speft_core/chat.py).
- Causal LM sequences are `[bos] + prompt + completion + [eos]` (bos/eos where the tokenizer has
  them), truncated on the right; when that would leave no completion token, the prompt is cut on
  the left instead so that at least one completion token stays (a prompt cut before
  tokenisation keeps its end). A truncated completion loses its eos (the text goes on). Examples
  left with no supervised token are kept (zero loss); only a dataset in which *no* example keeps
  one is an error.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from .chat_data import ChatExample, parse_chat_row
from .chat_data import ChatMessage as ChatMessage  # re-exported: the row types of every task
from .config import TASKS
from .errors import ConfigError, DatasetFormatError
from .jsonl import check_encodable, is_int, json_objects, json_type, required_str
from .lengths import char_bound, effective_max_length, encode_cut

if TYPE_CHECKING:  # transformers is only needed for the type
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value the loss skips (prompt, bos and padding positions)
MAX_LABELS = 1000  # distinct classification labels a file may hold
MAX_LABEL_LENGTH = 256  # characters of one label (`str(label)` for integers)
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


Example = ClassificationExample | CausalLMExample | ChatExample
Rows = list[ClassificationExample] | list[CausalLMExample] | list[ChatExample]


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
    if max_examples is not None and (not is_int(max_examples) or max_examples < 1):
        raise ConfigError("max_examples must be a positive integer or None", param="max_examples")
    return _parse_rows(json_objects(lines), task, max_examples)


def parse_dataset(
    lines: Iterable[bytes | str],
) -> tuple[str, Rows]:
    """Tell the task from the first object and validate every line for it: (task, examples)."""
    objects = json_objects(lines)
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
    if all(is_int(label) for label in raw):
        return [str(label) for label in sorted({int(label) for label in raw})]
    return sorted({str(label) for label in raw})


def check_label_sets(training: Sequence[str], validation: Sequence[str] | None = None) -> None:
    """A classifier's label sets (`label_set` of each file) hold at least two training labels
    and no validation label the training file lacks; DatasetFormatError naming the file if not."""
    if len(training) < 2:
        raise DatasetFormatError(f"the training file has a single label ({training[0]!r}); a "
                                 "classifier needs at least two", param="training_file")
    unknown = [label for label in validation or () if label not in set(training)]
    if unknown:
        raise DatasetFormatError(
            f"the validation file has {len(unknown)} label(s) the training file lacks: "
            f"{_some(unknown)} (the training labels: {_some(training)})", param="validation_file")


def _some(labels: Sequence[str], shown: int = 10) -> str:
    more = f", … ({len(labels) - shown} more)" if len(labels) > shown else ""
    return ", ".join(repr(label) for label in labels[:shown]) + more


def tokenize(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    *,
    max_length: int | str,
    label2id: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Turn examples into model features (`input_ids`, `attention_mask`, ..., `labels`) for `task`.

    Classification: `labels` is the class id (label2id defaults to `label_set(examples)` order);
    a label missing from `label2id` raises DatasetFormatError naming it. Causal LM: `labels` is a
    list, IGNORE_INDEX on bos and prompt positions. Examples are truncated to
    `effective_max_length(tokenizer, max_length)` tokens (an integer or 'auto').
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


def collate(features: Sequence[Mapping[str, Any]], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad features into tensors: ids with `pad_token_id`, masks with 0, label lists -100."""
    if not features:
        raise ValueError("collate needs at least one feature")
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        column = [feature[key] for feature in features]
        if key == "labels" and all(is_int(value) for value in column):
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
    if not is_int(batch_size) or batch_size < 1:
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
    text = required_str(row, "text", line, non_empty=True)
    if "label" not in row:
        raise DatasetFormatError("missing required field 'label'", line=line, param="label")
    label = row["label"]
    if not (isinstance(label, str) or is_int(label)):
        raise DatasetFormatError(f"'label' must be a string or integer, got {json_type(label)}",
                                 line=line, param="label")
    if isinstance(label, str) and not label.strip():
        raise DatasetFormatError("'label' must not be empty", line=line, param="label")
    if isinstance(label, str):
        check_encodable(label, "label", line)
    if len(str(label)) > MAX_LABEL_LENGTH:
        raise DatasetFormatError(
            f"'label' is longer than {MAX_LABEL_LENGTH} characters", line=line, param="label"
        )
    pair = row.get("text_pair")  # null counts as absent
    if pair is not None and not isinstance(pair, str):
        raise DatasetFormatError(
            f"'text_pair' must be a string, got {json_type(pair)}", line=line, param="text_pair"
        )
    if pair is not None:
        check_encodable(pair, "text_pair", line)
    return ClassificationExample(text=text, label=label, text_pair=pair, line=line)


def _parse_causal_lm(row: dict[str, Any], line: int) -> CausalLMExample | ChatExample:
    if "messages" in row:
        if {"prompt", "completion", "text"} & row.keys():
            raise DatasetFormatError(
                "use either 'messages' or 'prompt'/'completion'/'text', not both",
                line=line, param="messages",
            )
        return parse_chat_row(row, line)
    if "text" in row:
        if "prompt" in row or "completion" in row:
            raise DatasetFormatError(
                "use either 'text' or 'prompt' and 'completion', not both", line=line, param="text"
            )
        return CausalLMExample(
            prompt="", completion=required_str(row, "text", line, non_empty=True), line=line
        )
    if "prompt" not in row and "completion" not in row:
        raise DatasetFormatError("missing required field: give 'text', or 'prompt' and "
                                 "'completion'", line=line, param="text")
    prompt = required_str(row, "prompt", line, non_empty=False)
    completion = required_str(row, "completion", line, non_empty=True)
    return CausalLMExample(prompt=prompt, completion=completion, line=line)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {task!r}", param="task")


# --- tokenisation -------------------------------------------------------------------------------


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
        encoded = encode_cut(tokenizer, columns, bound=bound, need=max_length,
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
    prompts = encode_cut(tokenizer, [[e.prompt for e in examples]], bound=bound,
                         need=max_length + 1, keep_end=True, add_special_tokens=False)["input_ids"]
    completions = encode_cut(tokenizer, [[e.completion for e in examples]], bound=bound,
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
