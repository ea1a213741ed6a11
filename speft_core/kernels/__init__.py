"""Kernels for the sparse delta's gradient, behind one function chosen per device.

`sampled_grad(grad_out, x, pattern)` returns, for each masked entry j = (row, col),
sum_t grad_out[t, row] * x[t, col]: the gradient of the masked entries only, never a dense dW.

- CPU: a small C++ extension built on first use (`sddmm_cpu.cpp`, cached by torch);
  where no compiler is available, `torch.sparse.sampled_addmm` on transposed operands.
- CUDA: `torch.sparse.sampled_addmm` (cuSPARSE SDDMM) over the pattern's CSR layout.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("sddmm_cpu.cpp")
# -fopenmp matters: at::parallel_for is an inline OpenMP pragma, serial without it.
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_cpu_ext: ModuleType | None = None
_cpu_ext_failed = False


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


def _extension_name() -> str:
    """Name keyed by source, CPU and torch version, so a cached build never runs on the wrong CPU."""
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    key.update(platform.machine().encode() + platform.processor().encode())
    key.update(torch.__version__.encode())
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
        key.update(flags.encode())
    except (OSError, StopIteration):
        pass
    return "speft_sddmm_" + key.hexdigest()[:12]


def load_cpu_extension() -> ModuleType | None:
    """Build (first call) or load the C++ CPU kernel; None where it cannot be built."""
    global _cpu_ext, _cpu_ext_failed
    if _cpu_ext is not None or _cpu_ext_failed:
        return _cpu_ext
    with _lock:
        if _cpu_ext is None and not _cpu_ext_failed:
            if os.environ.get("SPEFT_DISABLE_CPU_EXTENSION") == "1":
                _cpu_ext_failed = True
                return None
            try:
                from torch.utils.cpp_extension import load

                _cpu_ext = load(
                    name=_extension_name(),
                    sources=[str(_SOURCE)],
                    extra_cflags=_CFLAGS,
                    extra_ldflags=_LDFLAGS,
                    verbose=False,
                )
                log.info("speft: built CPU SDDMM kernel %s", _extension_name())
            except Exception as err:  # no compiler / ninja: fall back, loudly once
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
    if grad_out.device.type == "cpu" and grad_out.dtype in (torch.float32, torch.float64):
        ext = load_cpu_extension()
        if ext is not None:
            return ext.sampled_grad(grad_out, x, pattern.used_rows, pattern.used_cols,
                                    pattern.row_pos, pattern.col_pos)
    if grad_out.dtype in (torch.float16, torch.bfloat16):
        grad_out, x = grad_out.float(), x.float()
    return _sampled_addmm(grad_out, x, pattern)
