"""Zero-cost salience metrics: one small score function per name, registered in `METRICS`.

Every metric scores the `.weight` of each targeted `nn.Linear`. A higher score means more
salient, so the weight is more likely to land in the top-k. Notation: `w` is the current
weight and `Σg` is the gradient of the per-example losses summed over all scoring examples.

Metrics that need data run the model in eval mode (so dropout does not make the scores
random). They take gradients only with respect to the target weights, through
`torch.autograd.grad`, so no parameter's `.grad` is touched. Afterwards each module's
train/eval flag and each target's `requires_grad` flag is put back. Scores are tensors with the
weight's shape, on the weight's device: float32, except that gradient, snip, taylor and force
score in the weight's dtype (their Σg accumulator, reused in place).

Memory (gradient, snip, taylor, force): scoring holds one Σg accumulator per targeted weight in
the weight's dtype (`.grad`, accumulated in place batch by batch) plus one micro-batch's
activations and their gradients, plus the one layer gradient being added; `scoring_batch_size`
sets the micro-batch. tests/core/test_scoring_memory.py measures it. fisher, grasp and synflow
hold more (float32 totals, per-example chunks, a double-backward graph).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import ConfigError, UnknownMetricError

ExampleLossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
"""Given (model, batch), returns the loss of each example on its own, with shape (N,)."""

# Largest number of float32 elements in one chunk of per-example fisher gradients (64 MiB).
FISHER_CHUNK_ELEMENTS = 2**24


@dataclass
class SalienceInputs:
    """What a metric scores and the data it may use."""

    model: nn.Module
    targets: Mapping[str, nn.Linear]
    batches: Sequence[Mapping[str, torch.Tensor]]
    loss_fn: ExampleLossFn
    seed: int = 0


ScoreFn = Callable[[SalienceInputs], dict[str, torch.Tensor]]

METRICS: dict[str, ScoreFn] = {}


def register(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator that adds a score function to `METRICS` under `name`."""

    def add(fn: ScoreFn) -> ScoreFn:
        METRICS[name] = fn
        return fn

    return add


def compute_salience(metric: str, inputs: SalienceInputs) -> dict[str, torch.Tensor]:
    """Score every target weight with `metric`: {name: float tensor shaped like the weight}."""
    score_fn = METRICS.get(metric)
    if score_fn is None:
        raise UnknownMetricError(
            f"unknown metric {metric!r}; valid metrics: {', '.join(sorted(METRICS))}",
            param="metric",
        )
    if not inputs.targets:
        return {}
    return score_fn(inputs)


# --- the metrics ---------------------------------------------------------------------------


@register("gradient")
def gradient_scores(inputs: SalienceInputs) -> dict[str, torch.Tensor]:
    """|Σg|: the signed gradient is summed over all examples first, then its magnitude taken."""
    with _scoring_mode(inputs) as weights:
        grads = _summed_gradients(inputs, weights)
    return _named(inputs, [g.abs_() for g in grads])


@register("magnitude")
def magnitude_scores(inputs: SalienceInputs) -> dict[str, torch.Tensor]:
    """|w|; needs no data."""
    return _named(inputs, [w.abs() for w in _weight_values(inputs)])


@register("snip")
def snip_scores(inputs: SalienceInputs) -> dict[str, torch.Tensor]:
    """|w·Σg| (SNIP connection sensitivity)."""
    products = _weight_gradient_products(inputs)
    return _named(inputs, [p.abs_() for p in products])


@register("taylor")
def taylor_scores(inputs: SalienceInputs) -> dict[str, torch.Tensor]:
    """(w·Σg)², the squared first-order Taylor term."""
    products = _weight_gradient_products(inputs)
    return _named(inputs, [p.square_() for p in products])


@register("force")
def force_scores(inputs: SalienceInputs) -> dict[str, torch.Tensor]:
    """−w·Σg: the first-order change in loss if the weight were set to zero."""
    products = _weight_gradient_products(inputs)
    return _named(inputs, [p.neg_() for p in products])


@register("fisher")
def fisher_scores(inputs: SalienceInputs) -> dict[str, torch.Tensor]:
    """Σ over examples of g_n², from exact per-example gradients."""
    linears = list(inputs.targets.values())
    with _scoring_mode(inputs) as weights:
        totals = _zeros_like(weights)
        for batch in _scoring_batches(inputs):
            _add_fisher_batch(inputs, batch, linears, weights, totals)
    return _named(inputs, totals)


@register("grasp")
def grasp_scores(inputs: SalienceInputs) -> dict[str, torch.Tensor]:
    """−w⊙(H·Σg), with H the Hessian of the summed loss over the target weights; largest kept.

    Exact over all scoring examples, as in GraSP: a first pass accumulates Σg (detached). A
    second pass adds, per batch, H_b·Σg = ∂(g_b·Σg)/∂w by double backprop, where g_b is that
    batch's gradient built with create_graph. Σ_b H_b·Σg = H·Σg. The sign makes weights whose
    removal would most reduce gradient flow score highest. Attention runs on the math SDPA
    kernel here because the fused kernels have no double backward.
    """
    with _scoring_mode(inputs) as weights:
        grads = _summed_gradients(inputs, weights)
        products = _hessian_gradient_products(inputs, weights, grads)
    values = _weight_values(inputs)
    return _named(inputs, [-w * hg for w, hg in zip(values, products)])


@register("synflow")
def synflow_scores(inputs: SalienceInputs) -> dict[str, torch.Tensor]:
    """|w·∂R/∂w| with every parameter made positive and an all-ones input; R = Σ output."""
    with _scoring_mode(inputs) as weights, _absolute_parameters(inputs.model):
        output = _call_with_ones(inputs)
        grads = _grads(output.float().sum(), weights)
        scores = [(w.detach().float() * g.float()).abs() for w, g in zip(weights, grads)]
    return _named(inputs, scores)


@register("random")
def random_scores(inputs: SalienceInputs) -> dict[str, torch.Tensor]:
    """Uniform [0, 1) scores from a generator seeded with `inputs.seed`, in target order."""
    generator = torch.Generator().manual_seed(inputs.seed)
    return {
        name: torch.rand(linear.weight.shape, generator=generator).to(linear.weight.device)
        for name, linear in inputs.targets.items()
    }


# --- shared machinery ----------------------------------------------------------------------


@contextmanager
def _scoring_mode(inputs: SalienceInputs) -> Iterator[list[torch.Tensor]]:
    """Eval mode and grad-enabled target weights for the block; yields the weights, restores all."""
    modes = [(module, module.training) for module in inputs.model.modules()]
    weights = [linear.weight for linear in inputs.targets.values()]
    flags = [weight.requires_grad for weight in weights]
    try:
        inputs.model.eval()
        for weight in weights:
            weight.requires_grad_(True)
        with torch.enable_grad():
            yield weights
    finally:
        for weight, flag in zip(weights, flags):
            weight.requires_grad_(flag)
        for module, training in modes:
            module.training = training


def _scoring_batches(inputs: SalienceInputs) -> Sequence[Mapping[str, torch.Tensor]]:
    """The scoring batches; a data metric with none would silently score all zeros."""
    if not inputs.batches:
        raise ConfigError("salience scoring needs at least one batch", param="scoring_examples")
    return inputs.batches


def _example_losses(inputs: SalienceInputs, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The loss function's per-example losses as float32, checked to be one-dimensional."""
    losses = inputs.loss_fn(inputs.model, batch)
    if losses.dim() != 1:
        shape = tuple(losses.shape)
        raise ValueError(f"loss_fn must return per-example losses of shape (N,); got {shape}")
    return losses.float()


def _grads(
    output: torch.Tensor, weights: list[torch.Tensor], *, create_graph: bool = False
) -> tuple[torch.Tensor, ...]:
    """∂output/∂weights, zeros for a weight that does not reach the output."""
    return torch.autograd.grad(
        output, weights, create_graph=create_graph, allow_unused=True, materialize_grads=True
    )


def _zeros_like(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]


def _weight_values(inputs: SalienceInputs) -> list[torch.Tensor]:
    """The target weights as detached float32 copies."""
    return [linear.weight.detach().float() for linear in inputs.targets.values()]


def _named(inputs: SalienceInputs, scores: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores by target name; floating scores keep their dtype (no float32 copy of bf16 ones)."""
    return {name: score.detach() if score.is_floating_point() else score.detach().float()
            for name, score in zip(inputs.targets, scores)}


def _summed_gradients(inputs: SalienceInputs, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Σg over all scoring batches (micro-batches), one accumulator per weight in its dtype.

    Memory bound: the backward pass accumulates into each weight's `.grad` (stolen on the
    first batch, added in place after), so besides one batch's activations and their
    gradients the pass holds one accumulator per target in the weight's dtype, plus the one
    layer gradient being added at that moment. Never a second full set of gradients, never a
    float32 copy of a bf16 model. Any `.grad` a caller had on the targets is put back.
    """
    saved = [weight.grad for weight in weights]
    try:
        for weight in weights:
            weight.grad = None
        for batch in _scoring_batches(inputs):
            loss = _example_losses(inputs, batch).sum()
            if loss.requires_grad:
                torch.autograd.backward(loss, inputs=weights)
            del loss
        return [weight.grad if weight.grad is not None else torch.zeros_like(weight)
                for weight in weights]
    finally:
        for weight, grad in zip(weights, saved):
            weight.grad = grad


def _weight_gradient_products(inputs: SalienceInputs) -> list[torch.Tensor]:
    """w·Σg for each target, computed in place in the gradient accumulators."""
    with _scoring_mode(inputs) as weights:
        grads = _summed_gradients(inputs, weights)
        return [g.mul_(w.detach()) for w, g in zip(weights, grads)]


def _hessian_gradient_products(
    inputs: SalienceInputs, weights: list[torch.Tensor], directions: list[torch.Tensor]
) -> list[torch.Tensor]:
    """H·v for fixed directions v, with H the Hessian of the summed loss over all batches."""
    totals = _zeros_like(weights)
    with sdpa_kernel(SDPBackend.MATH):
        for batch in _scoring_batches(inputs):
            batch_grads = _grads(_example_losses(inputs, batch).sum(), weights, create_graph=True)
            inner = sum((g.float() * v).sum() for g, v in zip(batch_grads, directions))
            if not isinstance(inner, torch.Tensor) or not inner.requires_grad:
                continue  # the loss is linear in the targets on this batch: H_b = 0
            for total, product in zip(totals, _grads(inner, weights)):
                total.add_(product.float())
    return totals


# --- fisher: exact per-example gradients from layer inputs and output gradients -----------


def _add_fisher_batch(
    inputs: SalienceInputs,
    batch: Mapping[str, torch.Tensor],
    linears: list[nn.Linear],
    weights: list[torch.Tensor],
    totals: list[torch.Tensor],
) -> None:
    """Add Σ_n g_n² of one batch to `totals`.

    Hooks record each target's input x and output gradient; G_n = Σ_positions grad_out_nᵀ x_n
    is exact because the summed per-example losses do not mix examples. A target whose hooks
    saw nothing usable (e.g. a wrapper that reads `.weight` without calling the Linear) falls
    back to one backward pass per example.
    """
    records: list[list[list[Any]]] = [[] for _ in linears]
    handles = [
        linear.register_forward_hook(_recorder(record), with_kwargs=True)
        for linear, record in zip(linears, records)
    ]
    try:
        losses = _example_losses(inputs, batch)
        _grads(losses.sum(), weights)  # fills the output gradients in the records
    finally:
        for handle in handles:
            handle.remove()
    count = losses.shape[0]
    missing = []
    for index, (record, weight) in enumerate(zip(records, weights)):
        if _record_usable(record, count, weight.shape):
            totals[index].add_(_squared_example_grads(record, count, weight))
        else:
            missing.append(index)
    if missing:
        subset = [weights[i] for i in missing]
        for index, squares in zip(missing, _squared_grads_one_by_one(inputs, batch, count, subset)):
            totals[index].add_(squares)


def _recorder(record: list[list[Any]]) -> Callable[..., None]:
    """A forward hook appending [input, output gradient] for each call of the Linear."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(output, torch.Tensor) or not output.requires_grad or x is None:
            return
        slot: list[Any] = [x.detach(), None]
        record.append(slot)
        output.register_hook(lambda grad: slot.__setitem__(1, grad.detach()))

    return hook


def _record_usable(record: list[list[Any]], count: int, shape: torch.Size) -> bool:
    """True when every recorded call has per-example leading dims matching the weight."""
    if not record:
        return False
    out_features, in_features = shape
    for x, grad in record:
        if grad is None:
            continue  # that call's output did not reach the loss: contributes nothing
        if x.dim() < 2 or x.shape[0] != count or x.shape[-1] != in_features:
            return False
        if grad.shape[:-1] != x.shape[:-1] or grad.shape[-1] != out_features:
            return False
    return True


def _squared_example_grads(
    record: list[list[Any]], count: int, weight: torch.Tensor
) -> torch.Tensor:
    """Σ_n G_n² with G_n = Σ_calls Σ_positions grad_out_nᵀ x_n, in chunks of examples."""
    out_features, in_features = weight.shape
    calls = [(x, grad) for x, grad in record if grad is not None]
    total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    chunk = max(1, FISHER_CHUNK_ELEMENTS // (out_features * in_features))
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        per_example = torch.zeros(
            (stop - start, out_features, in_features), dtype=torch.float32, device=total.device
        )
        for x, grad in calls:
            xs = x[start:stop].reshape(stop - start, -1, in_features).float()
            gs = grad[start:stop].reshape(stop - start, -1, out_features).float()
            per_example.add_(torch.einsum("npo,npi->noi", gs, xs))
        total.add_(per_example.square().sum(0))
    return total


def _squared_grads_one_by_one(
    inputs: SalienceInputs,
    batch: Mapping[str, torch.Tensor],
    count: int,
    weights: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Σ_n g_n² by one backward pass per example (tensors with leading dim N are sliced)."""
    totals = _zeros_like(weights)
    for n in range(count):
        example = {
            key: value[n : n + 1]
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == count
            else value
            for key, value in batch.items()
        }
        for total, grad in zip(totals, _grads(_example_losses(inputs, example).sum(), weights)):
            total.add_(grad.float().square())
    return totals


# --- synflow -------------------------------------------------------------------------------


@contextmanager
def _absolute_parameters(model: nn.Module) -> Iterator[None]:
    """Replace every floating parameter by its absolute value in place; restore bit-exactly."""
    negatives: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for param in model.parameters():
                if param.is_floating_point():
                    sign = torch.signbit(param)
                    param.abs_()
                    negatives.append((param, sign))
        yield
    finally:
        with torch.no_grad():
            for param, sign in negatives:
                param[sign] = param[sign].neg()


def _call_with_ones(inputs: SalienceInputs) -> torch.Tensor:
    """The model's output for an all-ones input shaped like one example of the first batch."""
    model = inputs.model
    batch = _scoring_batches(inputs)[0]
    input_ids = batch.get("input_ids")
    embeddings = getattr(model, "get_input_embeddings", None)
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and callable(embeddings):
        table = embeddings().weight
        length = input_ids.shape[1]
        ones = torch.ones(1, length, table.shape[1], dtype=table.dtype, device=table.device)
        mask = torch.ones(1, length, dtype=torch.long, device=table.device)
        output = model(inputs_embeds=ones, attention_mask=mask)
    elif isinstance(batch.get("x"), torch.Tensor):
        x = batch["x"]
        weight = next(iter(inputs.targets.values())).weight
        output = model(torch.ones(1, *x.shape[1:], dtype=weight.dtype, device=x.device))
    else:
        raise ConfigError(
            "synflow needs a batch with 2-D 'input_ids' (and a model with input embeddings) "
            "or an 'x' tensor to shape its all-ones input",
            param="metric",
        )
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else output[0]
