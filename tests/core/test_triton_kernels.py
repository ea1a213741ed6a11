"""The Triton kernels against the torch references, run on the CPU by Triton's interpreter.

Inputs are fresh random draws each run (the seed is in every failure message); shapes are not
multiples of the block sizes; masks and batches include the empty and one-row cases; columns
and rows no entry uses are poisoned with NaN, so a lane that reads outside its mask shows.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # tests/conftest.py sets it first: before any Triton import

import pytest
import torch
from torch import nn

from speft_core import kernels
from speft_core.kernels import (
    RowEntries,
    SegmentPlan,
    SparsePattern,
    _sampled_addmm,
    segment_sparse_add,
)
from speft_core.kernels import triton_kernels as tk
from speft_core.sparse_linear import inject_sparse_deltas

HALF = (torch.float16, torch.bfloat16)


@pytest.fixture
def seed() -> int:
    value = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(value)
    return value


@pytest.fixture
def forced(monkeypatch):
    """Route the kernel interface through Triton on CPU tensors."""
    monkeypatch.setenv("SPEFT_TRITON", "1")


def _mask(n_out: int, n_in: int, k: int) -> torch.Tensor:
    return torch.randperm(n_out * n_in)[:k].sort().values


def _poisoned(tokens: int, width: int, used: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Random (tokens, width) whose columns outside `used` are NaN."""
    values = torch.randn(tokens, width).to(dtype)
    unused = torch.ones(width, dtype=torch.bool)
    unused[used] = False
    values[:, unused] = float("nan")
    return values


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("tokens,n_out,n_in,k", [
    (1, 5, 7, 3),  # one token
    (45, 33, 29, 70),  # nothing a multiple of the blocks
    (300, 40, 24, 5),  # few entries, many tokens: the token axis split across programs
    (64, 17, 130, 17 * 130),  # every entry
])
def test_sampled_grad_matches_the_reference(seed, dtype, tokens, n_out, n_in, k):
    """fp32 results equal the float64 sampled product of the same (rounded) inputs."""
    pattern = SparsePattern.from_indices(_mask(n_out, n_in, k), (n_out, n_in))
    grad_out = _poisoned(tokens, n_out, pattern.rows.long(), dtype)
    x = _poisoned(tokens, n_in, pattern.cols.long(), dtype)
    out = tk.sampled_grad(grad_out, x, pattern.rows, pattern.cols)
    expected = _sampled_addmm(torch.nan_to_num(grad_out.double()),
                              torch.nan_to_num(x.double()), pattern)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5,
                               msg=lambda m: f"seed {seed}: {m}")


def test_split_tokens_covers_every_token_once():
    """Splits × tokens per split covers T, each split a whole number of tiles, none empty."""
    for tokens in (1, 31, 32, 33, 1000, 40_001):
        for k in (1, 64, 65, 10_000, 1_000_000):
            splits, per_split = tk.split_tokens(tokens, k)
            assert per_split % tk.GRAD_BLOCK_T == 0
            assert (splits - 1) * per_split < tokens <= splits * per_split


def test_sampled_grad_on_an_empty_mask_and_poisoned_partials(seed, monkeypatch):
    """k = 0 gives an empty result; with partial sums allocated as NaN, every entry is still
    written (nothing reads an unwritten partial)."""
    pattern = SparsePattern.from_indices(torch.zeros(0, dtype=torch.int64), (6, 4))
    assert tk.sampled_grad(torch.randn(9, 6), torch.randn(9, 4), pattern.rows,
                           pattern.cols).shape == (0,)
    full = torch.full
    monkeypatch.setattr(torch, "empty", lambda shape, **kw: full(shape, float("nan"), **kw))
    pattern = SparsePattern.from_indices(_mask(20, 30, 45), (20, 30))
    grad_out, x = torch.randn(500, 20), torch.randn(500, 30)
    out = tk.sampled_grad(grad_out, x, pattern.rows, pattern.cols)
    assert tk.split_tokens(500, 45)[0] > 1
    torch.testing.assert_close(out, _sampled_addmm(grad_out, x, pattern), atol=1e-4, rtol=1e-5)


def _entries(n_out: int, n_in: int, k: int, dtype: torch.dtype = torch.float32) -> RowEntries:
    flat = _mask(n_out, n_in, k)
    return RowEntries.from_rows(flat // n_in, flat % n_in, torch.randn(k).to(dtype))


def _expected(x: torch.Tensor, y: torch.Tensor, segments, n_out: int, n_in: int) -> torch.Tensor:
    out = y.double().clone()
    for start, stop, entries in segments:
        if entries is not None:
            delta = torch.zeros(n_out, n_in, dtype=torch.float64)
            delta[entries.rows, entries.cols] = entries.values.double()
            out[start:stop] += torch.nan_to_num(x[start:stop].double()) @ delta.T
    return out


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("shape", [(1, 1), (1, 19), (6, 3), (7,)])  # (rows, tokens); (rows,): 2-D
def test_segment_add_gives_each_row_its_own_adapter(seed, dtype, shape):
    """Each segment's rows get x·Δ_gᵀ; base segments and an adapter with no entries leave
    their rows bit for bit; unused input columns are NaN and never read."""
    n_out, n_in = 37, 45
    rows = shape[0]
    adapters = [_entries(n_out, n_in, 90), None, _entries(n_out, n_in, 0), _entries(n_out, n_in, 7)]
    bounds = sorted(torch.randint(0, rows + 1, (len(adapters) - 1,)).tolist())
    edges = [0, *bounds, rows]
    segments = [(edges[i], edges[i + 1], e) for i, e in enumerate(adapters)]
    used_cols = torch.cat([e.cols for e in adapters if e is not None])
    x = _poisoned(rows * (shape[1] if len(shape) > 1 else 1), n_in, used_cols, dtype)
    x = x.view(*shape, n_in)
    y = torch.randn(*shape, n_out).to(dtype)
    expected = _expected(x, y, segments, n_out, n_in)
    tk.segment_sparse_add(x, y, tk.TritonSegments.build(segments, x.device))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), expected, atol=tolerance, rtol=tolerance,
                               msg=lambda m: f"seed {seed}: {m}")
    for start, stop, entries in segments:
        if entries is None or entries.cols.numel() == 0:
            assert torch.equal(y[start:stop].double(), expected[start:stop])


def test_segment_layout_is_built_without_a_per_segment_loop_over_entries():
    """The table holds four numbers a segment, offsets into one concatenation per array."""
    first, second = _entries(10, 12, 20), _entries(10, 12, 5)
    layout = tk.TritonSegments.build([(0, 2, first), (2, 3, None), (3, 5, second)],
                                     torch.device("cpu"))
    assert layout.row_segment.tolist() == [0, 0, 1, 2, 2]
    u1 = first.used_rows.numel()
    assert layout.table.view(3, 4).tolist() == [
        [0, u1, 0, 0], [u1, 0, u1 + 1, 20], [u1, second.used_rows.numel(), u1 + 1, 20]]
    assert torch.equal(layout.cols, torch.cat([first.cols, second.cols]))
    assert layout.max_used == max(u1, second.used_rows.numel())


def test_the_kernel_interface_routes_through_triton_when_chosen(seed, forced, monkeypatch):
    """With Triton chosen, SegmentPlan lays out for it and both interface functions agree with
    the CPU kernels; with SPEFT_TRITON=0 the plan is the CPU one again."""
    assert kernels.triton_for(torch.device("cpu")) is tk
    n_out, n_in = 24, 20
    segments = [(0, 2, _entries(n_out, n_in, 40)), (2, 3, None), (3, 4, _entries(n_out, n_in, 9))]
    plan = SegmentPlan.build(segments)
    assert isinstance(plan.triton, tk.TritonSegments) and plan.pair_rows is None
    x, y = torch.randn(4, 5, n_in), torch.randn(4, 5, n_out)
    y_triton = y.clone()
    segment_sparse_add(x, y_triton, plan)
    torch.testing.assert_close(y_triton.double(), _expected(x, y, segments, n_out, n_in),
                               atol=1e-5, rtol=1e-5)
    pattern = SparsePattern.from_indices(_mask(n_out, n_in, 50), (n_out, n_in))
    grad_out, inputs = torch.randn(33, n_out), torch.randn(33, n_in)
    through_triton = kernels.sampled_grad(grad_out, inputs, pattern)
    monkeypatch.setenv("SPEFT_TRITON", "0")
    assert SegmentPlan.build(segments).triton is None
    torch.testing.assert_close(through_triton, kernels.sampled_grad(grad_out, inputs, pattern),
                               atol=1e-5, rtol=1e-5)


def test_triton_is_never_chosen_for_cpu_tensors_by_default(monkeypatch):
    """Without SPEFT_TRITON=1 the CPU keeps its C++ kernels, interpreter or not."""
    monkeypatch.delenv("SPEFT_TRITON", raising=False)
    assert kernels.triton_for(torch.device("cpu")) is None
    monkeypatch.setenv("SPEFT_TRITON", "0")
    assert kernels.triton_for(torch.device("cuda")) is None


def test_training_steps_through_the_triton_gradient_match_the_cpu_kernel(seed, forced,
                                                                         monkeypatch):
    """Three AdamW steps of a sparse-delta MLP give the same values either way."""
    def train() -> list[torch.Tensor]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3))
        masks = {"0": _mask(20, 12, 30).to(torch.int32), "2": _mask(3, 20, 8).to(torch.int32)}
        inject_sparse_deltas(model, masks)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        x, target = torch.randn(37, 12), torch.randint(0, 3, (37,))
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()
        return [p.detach().clone() for p in params]

    with_triton = train()
    monkeypatch.setenv("SPEFT_TRITON", "0")
    for a, b in zip(with_triton, train(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
