"""Chat rows: validation with line numbers, the template, masks token by token, a real run."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

from speft_core import data as datasets
from speft_core.chat import (
    DEFAULT_CHAT_TEMPLATE,
    TurnEnd,
    chat_template_for,
    render_chat,
    tokenize_chat,
    turn_end,
)
from speft_core.config import JobSpec
from speft_core.data import IGNORE_INDEX, ChatExample, ChatMessage
from speft_core.delta import CHAT_TEMPLATE_KEY, delta_to_bytes, load_delta
from speft_core.errors import DatasetFormatError
from speft_core.models import load_tokenizer
from speft_core.train import StepReport, TrainCallbacks, fine_tune

CHAT_SET = Path(__file__).parents[1] / "data" / "alpaca_chat40" / "train.jsonl"
CHATML = (  # Qwen-style: the end-of-turn marker follows every message
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(stories_dir: Path):
    """The stories260k tokenizer: fast, <s>/</s>, and no chat template of its own."""
    return load_tokenizer(stories_dir)


def chat_line(*messages: dict) -> str:
    return json.dumps({"messages": list(messages)})


USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello."}


@pytest.mark.parametrize("row, param, fragment", [
    ('{"messages": []}', "messages", "non-empty array, got an empty array"),
    ('{"messages": "hi"}', "messages", "non-empty array, got a string"),
    ('{"messages": [1]}', "messages[0]", "messages[0] must be an object, got a number"),
    (chat_line({"role": "bot", "content": "x"}, ASSISTANT), "messages[0].role",
     "messages[0].role must be one of system, developer, user, assistant, tool, function; "
     "got 'bot'"),
    (chat_line(USER, {"content": "x"}), "messages[1].role", "messages[1] has no 'role'"),
    (chat_line(USER, {"role": "assistant", "content": ""}), "messages[1].content",
     "messages[1].content must not be empty"),
    (chat_line(USER, {"role": "assistant", "content": "  \n"}), "messages[1].content",
     "must not be empty"),
    (chat_line(USER, {"role": "assistant", "content": 3}), "messages[1].content",
     "messages[1].content must be a string or an array of text parts, got a number"),
    (chat_line(USER, {"role": "assistant"}), "messages[1].content",
     "missing required field messages[1].content"),
    (chat_line(USER, {"role": "assistant", "content": ["a"]}), "messages[1].content[0]",
     "messages[1].content[0] must be an object, got a string"),
    (chat_line(USER), "messages", "the conversation has no assistant message"),
    (chat_line({"role": "system", "content": "Be kind."}, USER), "messages",
     "no assistant message"),
    (chat_line(USER, {**ASSISTANT, "weight": 0}), "messages", "every assistant message has weight 0"),
    (chat_line(USER, {**ASSISTANT, "weight": 2}), "messages[1].weight",
     "messages[1].weight must be 0 or 1; got 2"),
    (chat_line(USER, {**ASSISTANT, "weight": True}), "messages[1].weight", "got a boolean"),
    (chat_line({**USER, "weight": 1}, ASSISTANT), "messages[0].weight",
     "only allowed on assistant messages"),
    (chat_line(ASSISTANT, USER, ASSISTANT), "messages[0]", "messages[0] is an assistant message"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',
     "messages[0].content", "lone surrogate"),
    ('{"messages": [{"role": "user", "content": "a"}], "prompt": "b"}', "messages", "not both"),
])
def test_bad_chat_rows_name_the_line_and_field(row: str, param: str, fragment: str) -> None:
    good = chat_line(USER, ASSISTANT)
    with pytest.raises(DatasetFormatError) as info:
        datasets.parse_dataset([good, "", row])
    assert info.value.line == 3 and info.value.param == param
    assert fragment in info.value.message and info.value.message.startswith("line 3: ")


def test_chat_rows_are_causal_lm_with_weights_defaulting_to_one() -> None:
    task, rows = datasets.parse_dataset([
        "\ufeff" + chat_line({"role": "system", "content": "S"}, USER,
                             {**ASSISTANT, "weight": 0}, USER, ASSISTANT, ),
    ])
    assert task == "causal_lm" and datasets.detect_task({"messages": []}) == "causal_lm"
    (row,) = rows
    assert isinstance(row, ChatExample) and row.line == 1
    assert [(m.role, m.weight) for m in row.messages] == [
        ("system", 1), ("user", 1), ("assistant", 0), ("user", 1), ("assistant", 1)]


@pytest.mark.parametrize("first, second", [
    (chat_line(USER, ASSISTANT), '{"prompt": "a", "completion": "b"}'),
    ('{"text": "a story"}', chat_line(USER, ASSISTANT)),
])
def test_a_file_mixing_chat_and_other_rows_is_refused_at_the_second_kind(first: str,
                                                                         second: str) -> None:
    with pytest.raises(DatasetFormatError) as info:
        datasets.parse_dataset([first, second])
    assert info.value.line == 2 and "either all chat rows" in info.value.message


def test_prompt_completion_and_text_still_parse() -> None:
    task, rows = datasets.parse_dataset(['{"prompt": "a", "completion": "b"}', '{"text": "c"}'])
    assert task == "causal_lm" and all(isinstance(r, datasets.CausalLMExample) for r in rows)


def test_the_chat_test_set_is_forty_user_assistant_conversations() -> None:
    task, rows = datasets.parse_dataset(CHAT_SET.read_bytes().splitlines(keepends=True))
    assert task == "causal_lm" and len(rows) == 40
    assert all([m.role for m in row.messages] == ["user", "assistant"] for row in rows)
    assert (CHAT_SET.parent / "LICENSE-DATA").is_file()


def _supervised_spans(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Where each supervised piece lies in the text, found left to right."""
    spans, start = [], 0
    for piece in pieces:
        at = text.index(piece, start)
        spans.append((at, at + len(piece)))
        start = at + len(piece)
    return spans


def test_default_template_masks_exactly_the_weight_one_assistant_tokens(tokenizer) -> None:
    assert tokenizer.chat_template is None  # stories260k has none: the default applies
    assert chat_template_for(tokenizer) == DEFAULT_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo there", "weight": 0},
                {"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure."}]
    rendered = render_chat(tokenizer, messages)
    assert rendered.text == ("<s><|system|>\nBe kind.\n<|user|>\nHi\n<|assistant|>\nYo there</s>\n"
                             "<|user|>\nMore\n<|assistant|>\nSure.</s>\n")
    whole = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    assert rendered.input_ids == whole["input_ids"]  # the text tokenised once, as serving will
    assert rendered.input_ids[0] == tokenizer.bos_token_id
    # Token by token: supervised exactly when the token starts inside "Sure.</s>\n", the
    # weight-1 assistant message and what the template writes after it.
    (span,) = _supervised_spans(rendered.text, ["Sure.</s>\n"])
    expected = [span[0] <= start < span[1] for start, _ in whole["offset_mapping"]]
    assert rendered.assistant_mask == expected
    labels = rendered.labels
    assert [t for t, m in zip(rendered.input_ids, expected) if m] == [t for t in labels
                                                                     if t != IGNORE_INDEX]
    assert tokenizer.eos_token_id in [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]).startswith("Sure.</s>")

    # Both weights 1 (the default): both answers learned, nothing else.
    both = render_chat(tokenizer, [{k: v for k, v in m.items() if k != "weight"}
                                   for m in messages])
    spans = _supervised_spans(both.text, ["Yo there</s>\n", "Sure.</s>\n"])
    assert both.assistant_mask == [any(a <= start < b for a, b in spans)
                                   for start, _ in whole["offset_mapping"]]


def test_the_generation_prompt_ends_where_the_answer_begins(tokenizer) -> None:
    prompt = render_chat(tokenizer, [USER], add_generation_prompt=True)
    full = render_chat(tokenizer, [USER, ASSISTANT])
    assert full.text.startswith(prompt.text) and prompt.text.endswith("<|assistant|>\n")
    assert not any(prompt.assistant_mask)


def test_the_tokenizers_own_template_is_used_and_masks_follow_it(tokenizer) -> None:
    own = copy.deepcopy(tokenizer)
    own.chat_template = CHATML
    assert chat_template_for(own) == CHATML
    rendered = render_chat(own, [USER, ASSISTANT, USER, {**ASSISTANT, "content": "Bye."}])
    assert rendered.text.startswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    spans = _supervised_spans(rendered.text, ["Hello.<|im_end|>\n", "Bye.<|im_end|>\n"])
    offsets = own(rendered.text, add_special_tokens=False,
                  return_offsets_mapping=True)["offset_mapping"]
    assert rendered.assistant_mask == [any(a <= s < b for a, b in spans) for s, _ in offsets]
    # An explicit template wins over the tokenizer's own (serving passes the recorded one).
    assert render_chat(own, [USER, ASSISTANT],
                       template=DEFAULT_CHAT_TEMPLATE).text.startswith("<s><|user|>")


def test_the_end_of_turn_marker_is_what_the_template_writes_after_the_answer(tokenizer) -> None:
    # The default template ends a turn with eos; ChatML with <|im_end|>, several tokens of the
    # stories tokenizer (a stop string), or one where the tokenizer has it as a special token.
    assert turn_end(tokenizer) == TurnEnd(token_ids=(tokenizer.eos_token_id,))
    assert turn_end(tokenizer, CHATML) == TurnEnd(text="<|im_end|>")
    special = copy.deepcopy(tokenizer)
    special.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    marker = special.convert_tokens_to_ids("<|im_end|>")
    assert marker != special.eos_token_id
    assert turn_end(special, CHATML) == TurnEnd(token_ids=(marker,))
    nothing_after = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert turn_end(tokenizer, nothing_after) == TurnEnd()


def test_a_template_that_refuses_the_conversation_names_the_line(tokenizer) -> None:
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "{{ m['content'] }}{% endfor %}")
    rows = [ChatExample((ChatMessage("user", "a"), ChatMessage("assistant", "b")), line=1),
            ChatExample((ChatMessage("system", "s"), ChatMessage("user", "a"),
                         ChatMessage("assistant", "b")), line=4)]
    with pytest.raises(DatasetFormatError) as info:
        tokenize_chat(rows, tokenizer, max_length=64, template=strict)
    assert info.value.line == 4 and "System role not supported" in info.value.message


def test_conversations_longer_than_max_length_are_dropped_and_their_lines_returned(
        tokenizer) -> None:
    short = ChatExample((ChatMessage("user", "Hi"), ChatMessage("assistant", "Yo")), line=1)
    # 43 tokens from 54 characters of content: measured in tokens, over 32
    long = ChatExample((ChatMessage("user", "Once upon a time " * 3),
                        ChatMessage("assistant", "ok")), line=2)
    assert len(render_chat(tokenizer, long.messages).input_ids) > 32
    huge = ChatExample((ChatMessage("user", "a" * 5_000_000), ChatMessage("assistant", "b")),
                       line=3)
    started = time.perf_counter()
    result = tokenize_chat([short, long, huge], tokenizer, max_length=32)
    assert time.perf_counter() - started < 2  # the huge one is never rendered nor tokenised
    assert result.dropped_lines == [2, 3]
    (feature,) = result.features
    assert feature["input_ids"] == render_chat(tokenizer, short.messages).input_ids
    assert len(feature["input_ids"]) <= 32 and feature["attention_mask"] == [1] * len(
        feature["input_ids"])
    with pytest.raises(DatasetFormatError) as info:
        tokenize_chat([long], tokenizer, max_length=32)
    assert info.value.param == "max_length" and "no conversation fits" in info.value.message


def test_fine_tune_on_chat_lowers_the_loss_records_the_template_and_counts_drops(
        stories_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPEFT_MODELS_DIR", str(stories_dir.parent))
    lines = CHAT_SET.read_text().splitlines()
    too_long = chat_line({"role": "user", "content": "Tell me a story. " * 200}, ASSISTANT)
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join(lines[:32] + [too_long]) + "\n")
    dev_file = tmp_path / "dev.jsonl"
    dev_file.write_text("\n".join(lines[32:]) + "\n")
    spec = JobSpec.from_dict({
        "model": "stories-260k", "training_file": str(train_file),
        "validation_file": str(dev_file), "task": "causal_lm",
        "method": {"speft": {"metric": "gradient", "density": 0.05}},
        "hyperparameters": {"n_epochs": 8, "batch_size": 32, "learning_rate": 1e-2,
                            "max_length": 256, "warmup_ratio": 0.0},
    })
    steps: list[StepReport] = []
    events: list[tuple[str, dict]] = []
    result = fine_tune(spec, device=torch.device("cpu"), callbacks=TrainCallbacks(
        on_step=steps.append, on_event=lambda message, data: events.append((message, data))))

    assert len(steps) == 8 and steps[-1].train_loss < steps[0].train_loss - 0.1
    assert result.eval["eval_loss"] < result.base_eval["eval_loss"]
    dropped = [data for message, data in events
               if message == "conversations longer than max_length dropped"]
    assert dropped == [{"file": "training_file", "count": 1, "lines": [33], "max_length": 256}]
    delta = load_delta(delta_to_bytes(result.delta))
    assert delta.metadata[CHAT_TEMPLATE_KEY] == DEFAULT_CHAT_TEMPLATE
    assert delta.metadata["task"] == "causal_lm"


def test_prompt_completion_jobs_record_no_chat_template(stories_dir: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    monkeypatch.setenv("SPEFT_MODELS_DIR", str(stories_dir.parent))
    train_file = tmp_path / "train.jsonl"
    train_file.write_text('{"prompt": "Once", "completion": " upon a time"}\n' * 4)
    result = fine_tune(JobSpec.from_dict({
        "model": "stories-260k", "training_file": str(train_file), "task": "causal_lm",
        "hyperparameters": {"n_epochs": 1, "batch_size": 4, "max_length": 32},
    }), device=torch.device("cpu"))
    assert CHAT_TEMPLATE_KEY not in result.delta.metadata


def test_a_validation_file_of_the_other_kind_is_refused_naming_it(stories_dir: Path,
                                                                  tmp_path: Path,
                                                                  monkeypatch) -> None:
    monkeypatch.setenv("SPEFT_MODELS_DIR", str(stories_dir.parent))
    train_file, dev_file = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train_file.write_text("\n".join(CHAT_SET.read_text().splitlines()[:4]) + "\n")
    dev_file.write_text('{"prompt": "Once", "completion": " upon a time"}\n')
    with pytest.raises(DatasetFormatError) as info:
        fine_tune(JobSpec.from_dict({
            "model": "stories-260k", "training_file": str(train_file),
            "validation_file": str(dev_file), "task": "causal_lm",
            "hyperparameters": {"n_epochs": 1, "batch_size": 4, "max_length": 128},
        }), device=torch.device("cpu"))
    assert info.value.param == "validation_file" and "chat rows" in info.value.message
