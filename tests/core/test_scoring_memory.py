"""Salience scoring's peak memory: one Σg accumulator per targeted weight in the base dtype,
plus one micro-batch's activations (README, "The method, as implemented").

The peak is measured as the RSS high-water mark (VmHWM after resetting it through
/proc/self/clear_refs) in a fresh Python process whose malloc hands every block of 64 KiB or
more straight back to the kernel (MALLOC_MMAP_THRESHOLD_), so RSS follows the live tensors.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.probes import reset_hwm
from speft_core.salience import SalienceInputs, compute_salience
from speft_core.targets import find_target_linears
from speft_core.tasks import example_losses

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20

# A random Llama of 8 layers, hidden 256, MLP 2048: ~14.7M targeted weights (56 MiB in fp32),
# scored on micro-batches of 2 x 16 tokens.
PROBE = r"""
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from bench.probes import reset_hwm, vm_hwm, current_rss
from speft_core.salience import SalienceInputs, compute_salience
from speft_core.targets import find_target_linears
from speft_core.tasks import example_losses

dtype, examples, micro = getattr(torch, sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=2048, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
model = LlamaForCausalLM(config).to(dtype).eval()
for p in model.parameters():
    p.requires_grad_(False)
targets = find_target_linears(model, None)
ids = torch.randint(0, 128, (examples, 16), generator=torch.Generator().manual_seed(1))
batches = [{"input_ids": ids[i:i + micro], "attention_mask": torch.ones_like(ids[i:i + micro]),
            "labels": ids[i:i + micro]} for i in range(0, examples, micro)]
inputs = SalienceInputs(model, targets, batches, lambda m, b: example_losses(m, b, "causal_lm"))
compute_salience("gradient", SalienceInputs(model, targets, batches[:1], inputs.loss_fn))  # warm

# one micro-batch's activations and their gradients, with no weight gradient at all
embeds = model.get_input_embeddings()(batches[0]["input_ids"]).detach().requires_grad_()
before = current_rss()
assert reset_hwm()
loss = model(inputs_embeds=embeds, labels=batches[0]["labels"]).loss
torch.autograd.grad(loss, embeds)
del loss
activations = vm_hwm() - before

before = current_rss()
assert reset_hwm()
scores = compute_salience("gradient", inputs)
peak = vm_hwm() - before
weights = [t.weight for t in targets.values()]
print(json.dumps({
    "peak": peak,
    "accumulators": sum(w.numel() * w.element_size() for w in weights),
    "largest": max(w.numel() * w.element_size() for w in weights),
    "activations": activations,
    "score_dtype": str(next(iter(scores.values())).dtype),
}))
"""


# Global top-k at 1% over 24M fp32 scores in 6 modules (96 MiB of scores). Joining them and
# calling torch.topk held ~24 bytes a score (~576 MiB here, 18.5 GiB at a 1B model).
SELECTION_PROBE = r"""
import json, torch
from bench.probes import reset_hwm, vm_hwm, current_rss
from speft_core.masks import select_mask

generator = torch.Generator().manual_seed(0)
scores = {f"m{i}": torch.rand(2048, 2048, generator=generator) for i in range(6)}
select_mask({"w": torch.rand(64, 64)}, 0.01)  # warm
before = current_rss()
assert reset_hwm()
masks = select_mask(scores, 0.01)
print(json.dumps({"peak": vm_hwm() - before, "k": sum(m.numel() for m in masks.values()),
                  "mask_bytes": sum(m.numel() * m.element_size() for m in masks.values())}))
"""


def measure(*args: str | int, script: str = PROBE) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not reset_hwm(), reason="VmHWM cannot be reset on this kernel")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradient_scoring_peak_is_one_accumulator_per_weight_plus_one_batch(dtype: str):
    result = measure(dtype, 8, 2)
    # one accumulator per targeted weight in the base dtype, the one layer gradient being added,
    # one micro-batch's activations with their gradients (measured on their own), 4 MiB slack
    bound = result["accumulators"] + result["largest"] + result["activations"] + 4 * MIB
    assert result["peak"] <= bound, (
        f"scoring peaked at {result['peak'] / MIB:.1f} MiB; bound {bound / MIB:.1f} MiB "
        f"(accumulators {result['accumulators'] / MIB:.1f} MiB, "
        f"activations {result['activations'] / MIB:.1f} MiB)")
    assert result["peak"] >= 0.9 * result["accumulators"]  # the probe does see the accumulators
    assert result["score_dtype"] == f"torch.{dtype}"


@pytest.mark.skipif(not reset_hwm(), reason="VmHWM cannot be reset on this kernel")
def test_global_topk_never_holds_a_joined_copy_of_the_scores():
    result = measure(script=SELECTION_PROBE)
    assert result["k"] == round(0.01 * 6 * 2048 * 2048)
    # int64 positions per module before the int32 cast, the masks themselves, 32 MiB of chunked
    # working memory: well under the 96 MiB that one joined fp32 copy alone would take
    bound = 3 * result["mask_bytes"] + 32 * MIB
    assert result["peak"] <= bound, f"selection peaked at {result['peak'] / MIB:.1f} MiB"


def test_micro_batches_sum_to_the_one_batch_gradient():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    targets = find_target_linears(model, None)
    ids = torch.randint(0, 64, (6, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss_fn = lambda m, b: example_losses(m, b, "causal_lm")
    whole = compute_salience("gradient", SalienceInputs(model, targets, [batch], loss_fn))
    micro = [{k: v[i:i + 2] for k, v in batch.items()} for i in range(0, 6, 2)]
    parts = compute_salience("gradient", SalienceInputs(model, targets, micro, loss_fn))
    for name in targets:
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-4, atol=1e-6)
    assert all(t.weight.grad is None for t in targets.values())  # no .grad left behind
