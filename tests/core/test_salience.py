"""Salience metrics: each score against a hand-written reference, and side effects on real models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speft_core import salience
from speft_core.errors import ConfigError, UnknownMetricError
from speft_core.salience import METRICS, SalienceInputs, compute_salience

ALL_METRICS = (
    "fisher", "force", "gradient", "grasp", "magnitude", "random", "snip", "synflow", "taylor",
)

# --- the tiny model: x -> Linear(3, 2) -> head Linear(2, 1), squared error per example -------

W = torch.tensor([[0.5, -1.0, 0.25], [-0.75, 0.2, 1.5]])
B = torch.tensor([0.1, -0.2])
V = torch.tensor([1.5, -0.5])  # head weight (one output)
C = torch.tensor([0.3])  # head bias
X = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0], [-2.0, 0.5, 1.0], [1.0, 1.0, 1.0]])
Y = torch.tensor([1.0, -2.0, 0.5, 3.0])


class TinyNet(nn.Module):
    """One targeted Linear(3, 2) followed by a scalar head."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.head = nn.Linear(2, 1)
        with torch.no_grad():
            self.linear.weight.copy_(W)
            self.linear.bias.copy_(B)
            self.head.weight.copy_(V[None])
            self.head.bias.copy_(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.linear(x)).squeeze(-1)


class WrappedNet(TinyNet):
    """Reads the target's weight directly, never calling the Linear (as a delta wrapper might)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.linear.weight, self.linear.bias)
        return self.head(hidden).squeeze(-1)


def squared_error(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(batch["x"]) - batch["y"]) ** 2


def tiny_inputs(model: nn.Module | None = None, seed: int = 0) -> SalienceInputs:
    model = model if model is not None else TinyNet()
    batches = [{"x": X[:2], "y": Y[:2]}, {"x": X[2:], "y": Y[2:]}]
    return SalienceInputs(model, {"linear": model.linear}, batches, squared_error, seed=seed)


def residuals() -> torch.Tensor:
    """r_n = v·(W x_n + b) + c − y_n, written out without the model."""
    return (X @ W.T + B) @ V + C - Y


def summed_gradient() -> torch.Tensor:
    """Σg: ∂(r_n²)/∂W[o, i] = 2 r_n v[o] x_n[i], summed over the four examples."""
    return torch.outer(V, 2 * residuals() @ X)


def score(metric: str, inputs: SalienceInputs | None = None) -> torch.Tensor:
    inputs = inputs if inputs is not None else tiny_inputs()
    scores = compute_salience(metric, inputs)
    assert set(scores) == {"linear"}
    result = scores["linear"]
    assert result.dtype == torch.float32 and result.shape == (2, 3)
    return result


def test_registry_holds_every_metric():
    assert sorted(METRICS) == list(ALL_METRICS)


def test_gradient_is_abs_of_signed_sum():
    torch.testing.assert_close(score("gradient"), summed_gradient().abs())


def test_magnitude_is_abs_weight():
    torch.testing.assert_close(score("magnitude"), W.abs())


def test_snip_is_abs_weight_times_gradient():
    torch.testing.assert_close(score("snip"), (W * summed_gradient()).abs())


def test_taylor_is_squared_weight_times_gradient():
    torch.testing.assert_close(score("taylor"), (W * summed_gradient()) ** 2)


def test_force_is_minus_weight_times_gradient():
    torch.testing.assert_close(score("force"), -W * summed_gradient())


def per_example_squared_gradients() -> torch.Tensor:
    """Σ_n g_n² with g_n[o, i] = 2 r_n v[o] x_n[i]."""
    r = residuals()
    return sum(torch.outer(2 * r[n] * V, X[n]) ** 2 for n in range(len(X)))


def test_fisher_sums_squared_per_example_gradients():
    torch.testing.assert_close(score("fisher"), per_example_squared_gradients())


def test_fisher_chunked_and_wrapped_weight_match(monkeypatch):
    expected = per_example_squared_gradients()
    monkeypatch.setattr(salience, "FISHER_CHUNK_ELEMENTS", 1)  # one example per chunk
    torch.testing.assert_close(score("fisher"), expected)
    torch.testing.assert_close(score("fisher", tiny_inputs(WrappedNet())), expected)


def test_fisher_sums_over_repeated_calls_of_one_linear():
    torch.manual_seed(0)
    square = nn.Linear(3, 3)
    model = nn.Sequential(square, nn.Tanh(), square)
    x, y = torch.randn(5, 3), torch.randn(5, 3)

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((model(batch["x"]) - batch["y"]) ** 2).sum(-1)

    batches = [{"x": x[:3], "y": y[:3]}, {"x": x[3:], "y": y[3:]}]
    scores = compute_salience("fisher", SalienceInputs(model, {"sq": square}, batches, loss_fn))
    expected = brute_force_fisher(model, {"sq": square}, batches, loss_fn)["sq"]
    torch.testing.assert_close(scores["sq"], expected)


def test_grasp_is_minus_weight_times_hessian_gradient():
    def summed_loss(flat_weight: torch.Tensor) -> torch.Tensor:
        out = (X @ flat_weight.reshape(2, 3).T + B) @ V + C
        return ((out - Y) ** 2).sum()

    hessian = torch.autograd.functional.hessian(summed_loss, W.flatten())
    hg = (hessian @ summed_gradient().flatten()).reshape(2, 3)
    torch.testing.assert_close(score("grasp"), -W * hg)


def test_synflow_is_abs_weight_times_abs_downstream_path():
    # All parameters made positive and x = 1: R = Σ_o |v_o| (Σ_i |W_oi| + |b_o|) + |c|,
    # so ∂R/∂W_oi = |v_o| and the score is |W_oi|·|v_o|.
    torch.testing.assert_close(score("synflow"), W.abs() * V.abs()[:, None])


def test_synflow_restores_parameters_bit_exactly():
    model = TinyNet()
    with torch.no_grad():
        model.linear.weight[0, 0] = -0.0
    nan = torch.tensor(float("nan"))
    model.spare = nn.Parameter(torch.stack([torch.tensor(-0.0), nan, nan.neg(), torch.tensor(-3.0)]))
    before = {k: _bits(v).clone() for k, v in model.state_dict().items()}
    compute_salience("synflow", tiny_inputs(model))
    after = {k: _bits(v) for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_random_is_seeded_and_deterministic():
    first = score("random", tiny_inputs(seed=7))
    assert torch.equal(first, score("random", tiny_inputs(seed=7)))
    assert not torch.equal(first, score("random", tiny_inputs(seed=8)))
    assert ((first >= 0) & (first < 1)).all()


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_tiny_model_state_restored(metric):
    model = TinyNet()
    model.train()
    model.linear.weight.requires_grad_(False)  # a frozen target; the head stays trainable
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compute_salience(metric, tiny_inputs(model))
    assert model.training and model.linear.training
    assert model.linear.weight.requires_grad is False and model.head.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_metric_lists_valid_names():
    with pytest.raises(UnknownMetricError) as info:
        compute_salience("nope", tiny_inputs())
    assert info.value.param == "metric"
    assert all(name in info.value.message for name in ALL_METRICS)


def test_data_metric_without_batches_is_config_error():
    inputs = tiny_inputs()
    inputs.batches = []
    with pytest.raises(ConfigError):
        compute_salience("gradient", inputs)
    torch.testing.assert_close(compute_salience("magnitude", inputs)["linear"], W.abs())


def test_scalar_loss_is_rejected():
    inputs = tiny_inputs()
    inputs.loss_fn = lambda model, batch: squared_error(model, batch).sum()
    with pytest.raises(ValueError, match="per-example"):
        compute_salience("fisher", inputs)


# --- tiny Hugging Face models built from configs -------------------------------------------


def bert_inputs() -> SalienceInputs:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )
    model = BertForSequenceClassification(config)
    model.requires_grad_(False)  # a frozen base, as in a real run

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    batches = [_token_batch(3, 6, labels=2), _token_batch(2, 6, labels=2)]
    return SalienceInputs(model, _layer_linears(model, "encoder.layer"), batches, loss_fn)


def llama_inputs() -> SalienceInputs:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)  # parameters left trainable: must not matter

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tokens = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none"
        )
        mask = batch["attention_mask"][:, 1:].float()
        return (tokens * mask).sum(1) / mask.sum(1)

    batches = [_token_batch(3, 6), _token_batch(2, 6)]
    return SalienceInputs(model, _layer_linears(model, "model.layers"), batches, loss_fn)


HF_MODELS = {"bert": bert_inputs, "llama": llama_inputs}
LINEARS_PER_LAYER = {"bert": 6, "llama": 7}  # q k v o + two MLP; q k v o + gate up down


@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("kind", sorted(HF_MODELS))
def test_hf_model_scores_finite_and_model_untouched(kind, metric):
    inputs = HF_MODELS[kind]()
    model = inputs.model
    model.train()
    next(iter(model.children())).eval()  # mixed modes must come back as they were
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = {k: _bits(v).clone() for k, v in model.state_dict().items()}

    scores = compute_salience(metric, inputs)

    assert len(inputs.targets) == LINEARS_PER_LAYER[kind] * 2
    assert set(scores) == set(inputs.targets)
    for name, linear in inputs.targets.items():
        assert scores[name].shape == linear.weight.shape and scores[name].dtype == torch.float32
        assert torch.isfinite(scores[name]).all(), name
    if metric != "random":
        assert any(bool(s.any()) for s in scores.values())
    assert all(torch.equal(before[k], _bits(v)) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


@pytest.mark.parametrize("kind", sorted(HF_MODELS))
def test_hf_fisher_matches_one_example_at_a_time(kind, monkeypatch):
    inputs = HF_MODELS[kind]()
    monkeypatch.setattr(salience, "_squared_grads_one_by_one", None)  # the hooks must suffice
    scores = compute_salience("fisher", inputs)
    inputs.model.eval()
    expected = brute_force_fisher(inputs.model, inputs.targets, inputs.batches, inputs.loss_fn)
    for name in inputs.targets:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-4, atol=1e-9)


# --- helpers -------------------------------------------------------------------------------


def brute_force_fisher(model, targets, batches, loss_fn) -> dict[str, torch.Tensor]:
    """Σ_n g_n² by micro-batches of one example."""
    weights = [linear.weight for linear in targets.values()]
    flags = [w.requires_grad for w in weights]
    totals = [torch.zeros_like(w) for w in weights]
    for w in weights:
        w.requires_grad_(True)
    for batch in batches:
        count = next(iter(batch.values())).shape[0]
        for n in range(count):
            example = {key: value[n : n + 1] for key, value in batch.items()}
            grads = torch.autograd.grad(loss_fn(model, example).sum(), weights)
            for total, grad in zip(totals, grads):
                total += grad**2
    for w, flag in zip(weights, flags):
        w.requires_grad_(flag)
    return dict(zip(targets, totals))


def _token_batch(count: int, length: int, labels: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with the last example right-padded by two positions."""
    batch = {
        "input_ids": torch.randint(1, 100, (count, length)),
        "attention_mask": torch.ones(count, length, dtype=torch.long),
    }
    batch["attention_mask"][-1, -2:] = 0
    if labels:
        batch["labels"] = torch.randint(0, labels, (count,))
    return batch


def _layer_linears(model: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and prefix in name
    }


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a floating tensor (so -0.0 and NaN payloads compare exactly)."""
    if tensor.is_floating_point():
        return tensor.detach().contiguous().view(torch.uint8)
    return tensor.detach()

