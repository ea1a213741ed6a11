"""The mixed-batch kernel: each segment of batch rows gets exactly its own adapter's x·Δᵀ."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from speft_core.kernels import (
    RowEntries,
    SegmentPlan,
    load_cpu_extension,
    pair_layout,
    segment_sparse_add,
)


def _entries(n_out: int, n_in: int, k: int, seed: int, dtype: torch.dtype) -> RowEntries:
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n_out * n_in, generator=generator)[:k].sort().values
    values = torch.randn(k, generator=generator, dtype=dtype)
    return RowEntries.from_rows(flat // n_in, flat % n_in, values)


def _dense(entries: RowEntries, n_out: int, n_in: int) -> torch.Tensor:
    delta = torch.zeros(n_out, n_in, dtype=entries.values.dtype)
    delta[entries.rows, entries.cols] = entries.values
    return delta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows_per_segment,tokens", [(1, 1), (2, 1), (3, 7), (2, 40)])
def test_each_segment_gets_its_own_delta(dtype, rows_per_segment, tokens):
    """Rows of segment g equal x·(Δ_g)ᵀ added to y; a segment without entries is untouched
    (covers the scalar path for ≤ 2 tokens, partial and full tiles of 16)."""
    n_out, n_in = 48, 40
    adapters = [_entries(n_out, n_in, 150, seed, dtype) for seed in range(3)] + [None]
    segments = [(g * rows_per_segment, (g + 1) * rows_per_segment, e)
                for g, e in enumerate(adapters)]
    plan = SegmentPlan.build(segments)
    batch = len(adapters) * rows_per_segment
    x = torch.randn(batch, tokens, n_in, dtype=dtype)
    y = torch.randn(batch, tokens, n_out, dtype=dtype)
    expected = y.clone()
    for start, stop, entries in segments:
        if entries is not None:
            expected[start:stop] += x[start:stop] @ _dense(entries, n_out, n_in).T
    segment_sparse_add(x, y, plan)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, expected, atol=tolerance, rtol=tolerance)


def test_cpu_kernel_fallback_and_pair_layout_agree():
    """The C++ kernel, the per-segment fallback and the fused pair layout give the same sums."""
    assert load_cpu_extension() is not None
    n_out, n_in = 64, 32
    segments = [(0, 3, _entries(n_out, n_in, 200, 1, torch.float32)), (3, 4, None),
                (4, 9, _entries(n_out, n_in, 100, 2, torch.float32))]
    plan = SegmentPlan.build(segments)
    x = torch.randn(9, 20, n_in)
    kernel_out = torch.zeros(9, 20, n_out)
    segment_sparse_add(x, kernel_out, plan)
    fallback_out = torch.zeros(9, 20, n_out)
    segment_sparse_add(x.transpose(0, 1).contiguous().transpose(0, 1), fallback_out, plan)  # not contiguous: fallback
    torch.testing.assert_close(kernel_out, fallback_out, atol=1e-5, rtol=1e-5)
    assert kernel_out.abs().sum() > 0
    fused_out = torch.zeros(9, 20, n_out)  # the (row, entry) pair layout CUDA uses
    segment_sparse_add(x, fused_out, dataclasses.replace(plan, **pair_layout(segments)))
    torch.testing.assert_close(kernel_out, fused_out, atol=1e-5, rtol=1e-5)
