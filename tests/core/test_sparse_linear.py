"""The sparse delta layer against dense references."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from speft_core.kernels import SparsePattern, _sampled_addmm, load_cpu_extension, sampled_grad
from speft_core.sparse_linear import (
    SparseDeltaFunction,
    SparseDeltaLinear,
    inject_sparse_deltas,
    remove_sparse_deltas,
)


def _random_mask(shape, k, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(shape[0] * shape[1], generator=g)[:k].sort().values.to(torch.int32)


@pytest.mark.parametrize("shape,tokens", [((7, 5), 3), ((33, 70), 130), ((64, 16), 64)])
def test_sampled_grad_matches_dense_gradient_gather(shape, tokens):
    torch.manual_seed(0)
    idx = _random_mask(shape, max(1, shape[0] * shape[1] // 10))
    pattern = SparsePattern.from_indices(idx, shape)
    g, x = torch.randn(tokens, shape[0], dtype=torch.float64), torch.randn(tokens, shape[1], dtype=torch.float64)
    expected = (g.t() @ x).reshape(-1)[idx.long()]
    torch.testing.assert_close(sampled_grad(g, x, pattern), expected)
    torch.testing.assert_close(_sampled_addmm(g, x, pattern), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_cpu_kernel_takes_half_inputs_and_accumulates_in_fp32(dtype):
    shape, tokens = (33, 70), 200  # 200 tokens: four tiles, the last one partial
    idx = _random_mask(shape, 231, seed=torch.seed() % 2**31)
    pattern = SparsePattern.from_indices(idx, shape)
    g, x = torch.randn(tokens, shape[0]).to(dtype), torch.randn(tokens, shape[1]).to(dtype)
    expected = (g.double().t() @ x.double()).reshape(-1)[idx.long()]  # the same rounded inputs
    got = load_cpu_extension().sampled_grad(g, x, pattern.used_rows, pattern.used_cols,
                                            pattern.row_pos, pattern.col_pos)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)  # fp32 sums, not bf16
    torch.testing.assert_close(sampled_grad(g, x, pattern), got)


def test_cpu_extension_builds_here():
    # The machines this project runs on have a compiler; the fallback exists for those that don't.
    assert load_cpu_extension() is not None


def test_gradcheck_against_dense_reference():
    torch.manual_seed(0)
    base = nn.Linear(6, 4).double()
    idx = _random_mask((4, 6), 7)
    layer = SparseDeltaLinear(base, idx)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    values = torch.randn(7, dtype=torch.float64, requires_grad=True)
    original = layer.original.clone()
    weight = base.weight

    def sparse_fn(x, values):
        # Patch W' = W + Δ as the layer does; a fresh tensor per call since gradcheck
        # evaluates several times before each backward.
        patched = weight.detach().clone()
        patched.view(-1)[idx.long()] = original + values.detach()
        return SparseDeltaFunction.apply(x, patched, base.bias, values, layer.pattern)

    assert torch.autograd.gradcheck(sparse_fn, (x, values))

    def dense_fn(x, values):
        w0 = weight.detach().clone()
        w0.view(-1)[idx.long()] = original
        delta = torch.zeros(w0.numel(), dtype=w0.dtype).index_put((idx.long(),), values)
        return torch.nn.functional.linear(x, w0 + delta.view_as(w0), base.bias)

    out_s, out_d = sparse_fn(x, values), dense_fn(x, values)
    torch.testing.assert_close(out_s, out_d)
    gs = torch.autograd.grad(out_s.sum(), (x, values))
    gd = torch.autograd.grad(out_d.sum(), (x, values))
    torch.testing.assert_close(gs, gd)


def test_optimizer_holds_state_for_k_values_only():
    base = nn.Linear(32, 16)
    layer = SparseDeltaLinear(base, _random_mask((16, 32), 20))
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert [p.numel() for p in trainable] == [20]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    layer(torch.randn(4, 32)).pow(2).sum().backward()
    opt.step()
    assert all(s.numel() in (1, 20) for st in opt.state.values() for s in st.values())
    assert base.weight.grad is None


def test_apply_then_revert_is_bit_exact():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = inject_sparse_deltas(model, {"0": _random_mask((8, 8), 9), "2": _random_mask((3, 8), 4)})
    with torch.no_grad():
        for layer in layers.values():
            layer.values.add_(torch.randn_like(layer.values))
    model(torch.randn(2, 8))  # patches the weights
    assert not torch.equal(model[0].base.weight, before["0.weight"])
    deltas = remove_sparse_deltas(model)
    assert set(deltas) == {"0", "2"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_merge_keeps_delta_in_base():
    model = nn.Sequential(nn.Linear(5, 5))
    w0 = model[0].weight.detach().clone()
    idx = _random_mask((5, 5), 3)
    layers = inject_sparse_deltas(model, {"0": idx})
    with torch.no_grad():
        layers["0"].values.fill_(0.5)
    remove_sparse_deltas(model, merge=True)
    expected = w0.clone()
    expected.view(-1)[idx.long()] += 0.5
    torch.testing.assert_close(model[0].weight.detach(), expected)


def test_sparse_training_matches_dense_masked_reference_for_5_steps():
    """Same loss trajectory as training a dense weight whose gradient is masked (fp32, 1e-5)."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    sparse_model, dense_model = make(), make()
    dense_model.load_state_dict(sparse_model.state_dict())
    masks = {"0": _random_mask((32, 16), 50, seed=1), "2": _random_mask((4, 32), 12, seed=2)}
    inject_sparse_deltas(sparse_model, masks)
    sparse_params = [p for p in sparse_model.parameters() if p.requires_grad]
    dense_params = [dense_model[0].weight, dense_model[2].weight]
    for p in dense_model.parameters():
        p.requires_grad_(False)
    for p in dense_params:
        p.requires_grad_(True)
    grad_masks = []
    for name, p in zip(("0", "2"), dense_params):
        m = torch.zeros(p.numel())
        m[masks[name].long()] = 1
        grad_masks.append(m.view_as(p))
    opt_s = torch.optim.AdamW(sparse_params, lr=1e-2, weight_decay=0.0)
    opt_d = torch.optim.AdamW(dense_params, lr=1e-2, weight_decay=0.0)
    x, y = torch.randn(24, 16), torch.randint(0, 4, (24,))
    losses_s, losses_d = [], []
    for _ in range(5):
        for model, opt, losses in ((sparse_model, opt_s, losses_s), (dense_model, opt_d, losses_d)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if model is dense_model:
                for p, m in zip(dense_params, grad_masks):
                    p.grad.mul_(m)
            opt.step()
            losses.append(loss.item())
    assert losses_s[-1] < losses_s[0]
    torch.testing.assert_close(torch.tensor(losses_s), torch.tensor(losses_d), atol=1e-5, rtol=0)


def test_rejects_unsorted_or_out_of_range_indices():
    base = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="sorted"):
        SparseDeltaLinear(base, torch.tensor([3, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="out of range"):
        SparseDeltaLinear(nn.Linear(4, 4), torch.tensor([1, 16], dtype=torch.int32))
