"""Kernels for the sparse delta, each behind one function chosen per device.

`sampled_grad(grad_out, x, pattern)` returns, for each masked entry j = (row, col),
sum_t grad_out[t, row] * x[t, col]: the gradient of the masked entries only, never a dense dW.

- CPU: a small C++ extension built on first use (`sddmm_cpu.cpp`; `build.py` caches it per
  source, environment and CPU, and survives a builder killed mid-build);
  where no compiler is available, `torch.sparse.sampled_addmm` on transposed operands.
- CUDA: a Triton kernel (`triton_kernels.py`, the `gpu` extra) for fp32 / fp16 / bf16; without
  Triton, or for fp64, `torch.sparse.sampled_addmm` (cuSPARSE SDDMM) over the pattern's CSR
  layout, which stays the reference.

`segment_sparse_add(x, y, plan)` adds, for each segment of batch rows, its own adapter's x·Δᵀ
into y (the mixed batch of serving): one C++ call per module on the CPU
(`segment_add_cpu.cpp`); on CUDA one Triton launch per module over a per-batch segment table;
on CUDA without Triton one gather and one accumulating index_put over every (row, entry) pair
of the batch; else (the reference) a gather / multiply / index_add per segment.

`SPEFT_TRITON=0` turns the Triton kernels off. `SPEFT_TRITON=1` with `TRITON_INTERPRET=1`
runs them on CPU tensors through Triton's interpreter: how the tests check them without a GPU.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from speft_core.kernels.build import load_extension

if TYPE_CHECKING:  # Triton is imported only where its kernels serve (triton_for)
    from speft_core.kernels.triton_kernels import TritonSegments

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name)
            for name in ("sddmm_cpu.cpp", "segment_add_cpu.cpp", "bindings.cpp")]
# -fopenmp matters: at::parallel_for is an inline OpenMP pragma, serial without it.
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_EXTENSION = "speft_kernels"
_lock = threading.Lock()
_cpu_ext: ModuleType | None = None
_cpu_ext_failed = False
_CPU_DTYPES = (torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_for(device: torch.device) -> ModuleType | None:
    """The Triton kernels module where it serves this device, else None.

    On CUDA when Triton imports (unless SPEFT_TRITON=0); on the CPU only when forced through
    the interpreter (SPEFT_TRITON=1 and TRITON_INTERPRET=1).
    """
    choice = os.environ.get("SPEFT_TRITON", "auto")
    if choice == "0":
        return None
    if device.type != "cuda" and not (
            choice == "1" and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    try:
        from speft_core.kernels import triton_kernels as module
    except ImportError:  # no `gpu` extra: the torch paths
        return None
    return module


@dataclass(frozen=True)
class SparsePattern:
    """The masked entries of one (n_out, n_in) weight: sorted flat indices and their layouts."""

    indices: torch.Tensor  # (k,) int32/int64 sorted flat indices into weight.view(-1)
    rows: torch.Tensor  # (k,) row of each entry (same dtype as indices)
    cols: torch.Tensor  # (k,) column of each entry
    crow: torch.Tensor  # (n_out + 1,) CSR row pointers, for sampled_addmm
    shape: tuple[int, int]
    used_rows: torch.Tensor  # sorted distinct rows holding an entry
    used_cols: torch.Tensor  # sorted distinct columns holding an entry
    row_pos: torch.Tensor  # (k,) position of each entry's row in used_rows
    col_pos: torch.Tensor  # (k,) position of each entry's column in used_cols

    @classmethod
    def from_indices(cls, indices: torch.Tensor, shape: tuple[int, int]) -> SparsePattern:
        """Build every layout the kernels need, once per mask (never per step)."""
        n_out, n_in = shape
        flat = indices.to(torch.int64)
        rows, cols = flat // n_in, flat % n_in
        crow = torch.zeros(n_out + 1, dtype=torch.int64, device=indices.device)
        crow[1:] = torch.bincount(rows, minlength=n_out).cumsum(0)
        used_rows, row_pos = torch.unique(rows, sorted=True, return_inverse=True)
        used_cols, col_pos = torch.unique(cols, sorted=True, return_inverse=True)
        dtype = indices.dtype
        return cls(indices, rows.to(dtype), cols.to(dtype), crow.to(dtype), (n_out, n_in),
                   used_rows.to(dtype), used_cols.to(dtype), row_pos.to(dtype), col_pos.to(dtype))

    @property
    def nnz(self) -> int:
        """Number of masked entries."""
        return int(self.indices.numel())


def load_cpu_extension() -> ModuleType | None:
    """Load the C++ CPU kernel (built once per source, environment and CPU; see build.py), or
    None where it cannot be built."""
    global _cpu_ext, _cpu_ext_failed
    if _cpu_ext is not None or _cpu_ext_failed:
        return _cpu_ext
    with _lock:
        if _cpu_ext is None and not _cpu_ext_failed:
            if os.environ.get("SPEFT_DISABLE_CPU_EXTENSION") == "1":
                _cpu_ext_failed = True
                return None
            try:
                _cpu_ext = load_extension(_EXTENSION, _SOURCES, cflags=_CFLAGS, ldflags=_LDFLAGS)
            except Exception as err:  # noqa: BLE001 - no compiler, no ninja, lock held: fall back
                _cpu_ext_failed = True
                log.warning("speft: CPU kernel unavailable (%s); using sampled_addmm", err)
    return _cpu_ext


def _sampled_addmm(grad_out: torch.Tensor, x: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """SDDMM by torch.sparse.sampled_addmm with t-minor operands (contiguous dots)."""
    csr = torch.sparse_csr_tensor(
        pattern.crow, pattern.cols, torch.zeros(pattern.nnz, dtype=grad_out.dtype,
                                                device=grad_out.device),
        size=pattern.shape, check_invariants=False,
    )
    mat1 = grad_out.t().contiguous()  # (n_out, T), rows contiguous over t
    mat2 = x.t().contiguous().t()  # (T, n_in) stored column-major: columns contiguous over t
    return torch.sparse.sampled_addmm(csr, mat1, mat2, beta=0.0).values()


def sampled_grad(grad_out: torch.Tensor, x: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """Gradient at the masked entries: out[j] = sum_t grad_out[t, row_j] * x[t, col_j]."""
    if grad_out.dtype != x.dtype:
        dtype = torch.promote_types(grad_out.dtype, x.dtype)
        grad_out, x = grad_out.to(dtype), x.to(dtype)
    if pattern.nnz == 0:
        return grad_out.new_zeros(0)
    gpu = triton_for(grad_out.device) if grad_out.dtype in _TRITON_DTYPES else None
    if gpu is not None:
        return gpu.sampled_grad(grad_out, x, pattern.rows, pattern.cols)
    if grad_out.device.type == "cpu":  # bf16 / fp16 widen to fp32 inside the kernel
        ext = load_cpu_extension()
        if ext is not None:
            return ext.sampled_grad(grad_out, x, pattern.used_rows, pattern.used_cols,
                                    pattern.row_pos, pattern.col_pos)
    if grad_out.dtype in (torch.float16, torch.bfloat16):
        grad_out, x = grad_out.float(), x.float()
    return _sampled_addmm(grad_out, x, pattern)


@dataclass(frozen=True)
class RowEntries:
    """One module's sparse delta by row: CSR over the rows it uses, plus each entry's row."""

    rows: torch.Tensor  # (k,) int64, sorted: the row of each entry
    cols: torch.Tensor  # (k,) int64
    values: torch.Tensor  # (k,)
    used_rows: torch.Tensor  # (u,) int64, the distinct rows
    row_ptr: torch.Tensor  # (u + 1,) int64: entries of used_rows[i] are [row_ptr[i], row_ptr[i+1])

    @classmethod
    def from_rows(cls, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> RowEntries:
        """Entries sorted by row (as flat indices are) -> the CSR layout over used rows."""
        used_rows, counts = torch.unique_consecutive(rows, return_counts=True)
        row_ptr = torch.zeros(used_rows.numel() + 1, dtype=torch.int64, device=rows.device)
        row_ptr[1:] = counts.cumsum(0)
        return cls(rows, cols, values.contiguous(), used_rows, row_ptr)

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return sum(t.numel() * t.element_size()
                   for t in (self.rows, self.cols, self.values, self.used_rows, self.row_ptr))


@dataclass(frozen=True)
class SegmentPlan:
    """One module's entries for every segment of a batch, concatenated once per batch.

    Segment g covers batch rows [segment_rows[g], segment_rows[g+1]) and its rows of the CSR
    layout are used_rows[segment_used[g]:segment_used[g+1]]; row_ptr holds, per segment, its
    used rows' entry offsets into cols / values (one more than its used rows).
    """

    segment_rows: torch.Tensor
    segment_used: torch.Tensor
    used_rows: torch.Tensor
    row_ptr: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    segments: tuple[tuple[int, int, RowEntries | None], ...]  # for the per-segment fallback
    # Off the CPU: every (batch row, entry) pair of the batch, for one fused gather/index_put
    pair_rows: torch.Tensor | None = None
    pair_cols: torch.Tensor | None = None
    pair_outs: torch.Tensor | None = None
    pair_values: torch.Tensor | None = None
    triton: TritonSegments | None = None  # the Triton kernel's layout, where it serves

    @classmethod
    def build(cls, segments: list[tuple[int, int, RowEntries | None]]) -> SegmentPlan:
        """Plan contiguous segments (start, stop, entries or None) covering rows from 0."""
        device = torch.device(next((e.cols.device for _, _, e in segments if e is not None),
                                   "cpu"))
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        gpu = triton_for(device)
        if gpu is not None or device.type != "cpu":  # the CSR layout feeds the CPU kernel only
            no_rows = torch.zeros(1, dtype=torch.int64)
            layout = ({"triton": gpu.TritonSegments.build(segments, device)} if gpu is not None
                      else pair_layout(segments))
            return cls(segment_rows=no_rows, segment_used=no_rows, used_rows=empty,
                       row_ptr=empty, cols=empty, values=empty.float(),
                       segments=tuple(segments), **layout)
        used, ptrs, cols, values = [], [], [], []
        offset = 0
        for _, _, entries in segments:
            if entries is None:
                ptrs.append(torch.tensor([offset], dtype=torch.int64, device=device))
                continue
            used.append(entries.used_rows)
            ptrs.append(entries.row_ptr + offset)
            cols.append(entries.cols)
            values.append(entries.values)
            offset += entries.cols.numel()
        bounds = [segments[0][0]] + [stop for _, stop, _ in segments]
        counts = [0] + [e.used_rows.numel() if e is not None else 0 for _, _, e in segments]
        return cls(
            segment_rows=torch.tensor(bounds, dtype=torch.int64),
            segment_used=torch.tensor(counts, dtype=torch.int64).cumsum(0),
            used_rows=torch.cat(used) if used else empty, row_ptr=torch.cat(ptrs),
            cols=torch.cat(cols) if cols else empty,
            values=torch.cat(values) if values else empty.float(),
            segments=tuple(segments),
        )


def segment_sparse_add(x: torch.Tensor, y: torch.Tensor, plan: SegmentPlan) -> None:
    """y[rows of g] += x[rows of g] · Δ_gᵀ for each segment g of the plan, in place.

    x is (batch, ..., n_in) and y (batch, ..., n_out), both batch-first: a segment's rows are
    all of their tokens.
    """
    if plan.triton is not None and y.is_contiguous() and x.dtype in _TRITON_DTYPES:
        plan.triton.add(x, y)
        return
    if (plan.triton is None and x.device.type == "cpu" and x.dtype in _CPU_DTYPES
            and plan.values.dtype == x.dtype
            and x.is_contiguous() and y.is_contiguous()):
        ext = _cpu_ext or load_cpu_extension()
        if ext is not None:
            ext.segment_sparse_add(x, y, plan.segment_rows, plan.segment_used, plan.used_rows,
                                   plan.row_ptr, plan.cols, plan.values)
            return
    if plan.pair_rows is not None and x.dim() >= 2:
        # (batch, tokens, features) viewed as (batch, features, tokens): each pair moves a
        # vector over the row's tokens; one gather and one accumulate for every segment
        xt = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)
        yt = y.view(y.shape[0], -1, y.shape[-1]).transpose(1, 2)
        products = xt[plan.pair_rows, plan.pair_cols] * plan.pair_values.unsqueeze(-1)
        yt.index_put_((plan.pair_rows, plan.pair_outs), products.to(y.dtype), accumulate=True)
        return
    tokens_per_row = x[0].numel() // x.shape[-1] if x.dim() > 1 else 1
    x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    for start, stop, entries in plan.segments:
        if entries is not None:
            rows = slice(start * tokens_per_row, stop * tokens_per_row)
            product = x2[rows].index_select(-1, entries.cols) * entries.values
            y2[rows].index_add_(-1, entries.rows, product)


def pair_layout(segments: list[tuple[int, int, RowEntries | None]]) -> dict[str, torch.Tensor]:
    """Every (batch row, entry) pair of the segments: SegmentPlan's fused path off the CPU."""
    rows, cols, outs, values = [], [], [], []
    for start, stop, entries in segments:
        if entries is None or stop <= start:
            continue
        count, k = stop - start, entries.cols.numel()
        batch_rows = torch.arange(start, stop, device=entries.cols.device)
        rows.append(batch_rows.repeat_interleave(k))
        cols.append(entries.cols.repeat(count))
        outs.append(entries.rows.repeat(count))
        values.append(entries.values.repeat(count))
    if not rows:
        return {}
    return {"pair_rows": torch.cat(rows), "pair_cols": torch.cat(cols),
            "pair_outs": torch.cat(outs), "pair_values": torch.cat(values)}
