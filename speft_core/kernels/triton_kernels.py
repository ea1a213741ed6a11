"""Triton kernels for the sparse delta on CUDA (the `gpu` extra).

Two kernels, each behind a function of `speft_core.kernels` that picks it on CUDA:

- `sampled_grad`: out[j] = Σₜ grad_out[t, row_j] · x[t, col_j] at the mask's k entries. One
  program takes BLOCK_K entries (sorted by row, as masks are, so neighbouring lanes read
  neighbouring rows of grad_out) and walks its share of the tokens in tiles of BLOCK_T,
  accumulating in fp32 whatever the input dtype. When the mask has few entries and the batch
  many tokens, the token axis is split across programs (`split_tokens`): each writes its own
  partial row and one sum adds them, so the result is deterministic (no atomics).
- `segment_sparse_add`: the mixed batch. For batch row b, used row u of its segment's adapter
  and a tile of tokens, one program adds Σ_e x[b, t, col_e] · value_e over the row's entries
  into y[b, t, row_u]. Each (b, row) belongs to one program, so no atomics either. The
  per-batch work is one small segment table (`TritonSegments`, built on the host from sizes
  the adapters already know) and one concatenation per layout array: a constant number of
  launches whatever the number of segments.

Both run on the CPU under `TRITON_INTERPRET=1` (set before this module is imported), which is
how the test suite checks them against the torch references without a GPU.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from speft_core.kernels import RowEntries

GRAD_BLOCK_K = 64  # entries per program
GRAD_BLOCK_T = 32  # tokens per tile
TARGET_PROGRAMS = 1024  # enough to fill an H100/H200 several times over
ADD_BLOCK_T = 16  # tokens per program of the mixed batch
ADD_BLOCK_E = 16  # entries per inner step of a row
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _sampled_grad_kernel(g_ptr, x_ptr, rows_ptr, cols_ptr, out_ptr, n_tokens, k,
                         stride_g, stride_x, tokens_per_split,
                         BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k
    rows = tl.load(rows_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    cols = tl.load(cols_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    t_start = pid_split * tokens_per_split
    t_stop = tl.minimum(t_start + tokens_per_split, n_tokens)
    for t0 in range(t_start, t_stop, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        both = (offs_t < t_stop)[:, None] & mask_k[None, :]
        t64 = offs_t.to(tl.int64)[:, None]
        g = tl.load(g_ptr + t64 * stride_g + rows[None, :], mask=both, other=0.0)
        xv = tl.load(x_ptr + t64 * stride_x + cols[None, :], mask=both, other=0.0)
        acc += tl.sum(g.to(tl.float32) * xv.to(tl.float32), axis=0)
    tl.store(out_ptr + pid_split * k + offs_k, acc, mask=mask_k)


def split_tokens(n_tokens: int, k: int) -> tuple[int, int]:
    """(splits, tokens per split): how the token axis is shared so the launch fills the GPU.

    Tokens per split is a whole number of BLOCK_T tiles; splits is at least 1.
    """
    tiles = max(1, triton.cdiv(n_tokens, GRAD_BLOCK_T))
    entry_blocks = max(1, triton.cdiv(k, GRAD_BLOCK_K))
    wanted = max(1, min(tiles, triton.cdiv(TARGET_PROGRAMS, entry_blocks)))
    per_split = triton.cdiv(tiles, wanted) * GRAD_BLOCK_T
    return max(1, triton.cdiv(n_tokens, per_split)), per_split


def sampled_grad(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """fp32 (k,) gradient at entries (rows[j], cols[j]) of grad_out (T, n_out) and x (T, n_in),
    both fp32, fp16 or bf16 (the same dtype)."""
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_tokens, k = grad_out.shape[0], rows.numel()
    splits, per_split = split_tokens(n_tokens, k)
    partial = torch.empty((splits, k), dtype=torch.float32, device=grad_out.device)
    if k == 0:
        return partial.new_zeros(0)
    grid = (triton.cdiv(k, GRAD_BLOCK_K), splits)
    _sampled_grad_kernel[grid](grad_out, x, rows, cols, partial, n_tokens, k,
                               grad_out.stride(0), x.stride(0), per_split,
                               BLOCK_K=GRAD_BLOCK_K, BLOCK_T=GRAD_BLOCK_T)
    return partial[0] if splits == 1 else partial.sum(0)


@triton.jit
def _segment_add_kernel(x_ptr, y_ptr, row_segment_ptr, table_ptr, used_rows_ptr, row_ptr_ptr,
                        cols_ptr, values_ptr, n_tokens, stride_xb, stride_xt, stride_yb,
                        stride_yt, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0)
    u = tl.program_id(1)
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    seg = tl.load(row_segment_ptr + b).to(tl.int64)
    used_start = tl.load(table_ptr + seg * 4)
    used_count = tl.load(table_ptr + seg * 4 + 1)
    if u < used_count:
        ptr_at = tl.load(table_ptr + seg * 4 + 2) + u
        entry_base = tl.load(table_ptr + seg * 4 + 3)
        row = tl.load(used_rows_ptr + used_start + u)
        e_start = entry_base + tl.load(row_ptr_ptr + ptr_at)
        e_stop = entry_base + tl.load(row_ptr_ptr + ptr_at + 1)
        mask_t = offs_t < n_tokens
        t64 = offs_t.to(tl.int64)
        x_row = x_ptr + b.to(tl.int64) * stride_xb + t64 * stride_xt
        acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for e0 in range(e_start, e_stop, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < e_stop
            cols = tl.load(cols_ptr + offs_e, mask=mask_e, other=0)
            values = tl.load(values_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
            xv = tl.load(x_row[:, None] + cols[None, :], mask=mask_t[:, None] & mask_e[None, :],
                         other=0.0)
            acc += tl.sum(xv.to(tl.float32) * values[None, :], axis=1)
        y_at = y_ptr + b.to(tl.int64) * stride_yb + t64 * stride_yt + row
        current = tl.load(y_at, mask=mask_t, other=0.0)
        tl.store(y_at, (current.to(tl.float32) + acc).to(current.dtype), mask=mask_t)


@dataclass(frozen=True)
class TritonSegments:
    """One module's mixed-batch layout for `segment_sparse_add`.

    row_segment[b] is batch row b's segment; table holds, per segment, four int64s: where its
    used rows start in used_rows, how many there are, where its row pointers start in row_ptr
    (each adapter's local pointers, one more than its used rows) and the offset of its entries
    in cols / values. max_used is the widest segment's used-row count (the launch's 2nd axis).
    """

    row_segment: torch.Tensor
    table: torch.Tensor
    used_rows: torch.Tensor
    row_ptr: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    max_used: int

    @classmethod
    def build(cls, segments: Sequence[tuple[int, int, RowEntries | None]],
              device: torch.device) -> TritonSegments:
        """Lay out contiguous segments (start, stop, entries or None) covering rows from 0."""
        row_segment: list[int] = []
        table: list[int] = []
        present = [e for _, _, e in segments if e is not None]
        used_at = ptr_at = entry_at = 0
        for index, (start, stop, entries) in enumerate(segments):
            row_segment += [index] * (stop - start)
            used = entries.used_rows.numel() if entries is not None else 0
            table += [used_at, used, ptr_at, entry_at]
            if entries is not None:
                used_at, ptr_at = used_at + used, ptr_at + used + 1
                entry_at += entries.cols.numel()

        def joined(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)

        return cls(
            row_segment=torch.tensor(row_segment, dtype=torch.int32, device=device),
            table=torch.tensor(table, dtype=torch.int64, device=device),
            used_rows=joined([e.used_rows for e in present], torch.int64),
            row_ptr=joined([e.row_ptr for e in present], torch.int64),
            cols=joined([e.cols for e in present], torch.int64),
            values=joined([e.values for e in present], torch.float32),
            max_used=max((e.used_rows.numel() for e in present), default=0),
        )

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """`segment_sparse_add(x, y, self)`: the plan's own kernel, no device lookup per call."""
        segment_sparse_add(x, y, self)


def segment_sparse_add(x: torch.Tensor, y: torch.Tensor, layout: TritonSegments) -> None:
    """y[b] += x[b] · Δ_{segment(b)}ᵀ for every batch row b, in place; x (batch, ..., n_in) and
    y (batch, ..., n_out), batch-first, each row's tokens contiguous in the feature axis."""
    if layout.max_used == 0 or x.shape[0] == 0:
        return
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    y3 = y.view(y.shape[0], -1, y.shape[-1])
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    n_tokens = x3.shape[1]
    grid = (x3.shape[0], layout.max_used, triton.cdiv(n_tokens, ADD_BLOCK_T))
    _segment_add_kernel[grid](x3, y3, layout.row_segment, layout.table, layout.used_rows,
                              layout.row_ptr, layout.cols, layout.values, n_tokens,
                              x3.stride(0), x3.stride(1), y3.stride(0), y3.stride(1),
                              BLOCK_T=ADD_BLOCK_T, BLOCK_E=ADD_BLOCK_E)
