"""The sparse delta layer: W' = W + scatter(indices, values), trained on k entries only.

How it stays cheap:
- The frozen base weight W is never copied. Its k masked entries are kept once (`original`,
  k values) and W is *patched in place*: W.flat[idx] = original + values, re-done only when
  the values change (an optimizer step). The forward is then one plain `F.linear(x, W')`,
  exactly the base model's cost, with no dense W + Δ materialised and no second product.
- The backward returns grad_x = grad_out · W' (one matmul, as for any frozen layer) and the
  gradient of the k values only, by a sampled dense-dense product (`kernels.sampled_grad`):
  never a dense dW. The optimizer sees only `values` (k,).
- Reverting writes `original` back with index_put: the base is restored bit for bit.
- The base may be bf16/fp16; `values` (and so AdamW's state) are always float32
  (`VALUES_DTYPE`), and each patch is `added_entries(original, values)`: summed in float32,
  rounded once to the weight dtype. Small steps are never lost to bf16 rounding of the values.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .delta import added_entries, index_dtype
from .kernels import SparsePattern, sampled_grad

VALUES_DTYPE = torch.float32
"""The dtype of the trained values, whatever the base weight's dtype."""


class SparseDeltaFunction(torch.autograd.Function):
    """y = x·W'ᵀ + b for a weight already patched with the delta; grads for x and values only."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, pattern):  # type: ignore[override]
        ctx.pattern = pattern
        ctx.save_for_backward(x if values.requires_grad else None, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_2d.mm(weight.to(grad_2d.dtype)).view(*grad_out.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[3]:
            x_2d = x.reshape(-1, x.shape[-1])
            grad_values = sampled_grad(grad_2d, x_2d, ctx.pattern).to(VALUES_DTYPE)
        return grad_x, None, None, grad_values, None


class SparseDeltaLinear(nn.Module):
    """Wraps a frozen nn.Linear and trains `values` at the sorted flat `indices` of its weight."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor, values: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SparseDeltaLinear wraps nn.Linear, got {type(base).__name__}")
        if not base.weight.is_contiguous():
            raise ValueError("the base weight must be contiguous to be patched in place")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        weight = base.weight
        self.values = nn.Parameter(torch.zeros(0, dtype=VALUES_DTYPE, device=weight.device))
        self.register_buffer("indices", torch.zeros(0, dtype=index_dtype(weight.numel())))
        self.register_buffer("original", torch.zeros(0, dtype=weight.dtype, device=weight.device))
        self.pattern: SparsePattern
        self._synced_version: int | None = None
        self.set_mask(indices, values)

    @property
    def nnz(self) -> int:
        """Number of trained entries."""
        return int(self.indices.numel())

    def set_mask(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Move the delta to new sorted flat indices (values default to zero); W stays exact."""
        weight = self.base.weight
        indices = indices.to(device=weight.device, dtype=index_dtype(weight.numel()))
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError("indices must be sorted and unique")
        if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= weight.numel()):
            raise ValueError("indices out of range for the weight")
        with torch.no_grad():
            if self.original.numel():  # put the old entries back before moving
                weight.view(-1).index_put_((self.indices.long(),), self.original)
            self.indices = indices
            self.original = weight.view(-1)[indices.long()].clone()
            new_values = (torch.zeros_like(self.original, dtype=VALUES_DTYPE) if values is None
                          else values.detach().to(device=weight.device, dtype=VALUES_DTYPE))
            if new_values.shape != self.original.shape:
                raise ValueError(f"{new_values.numel()} values for {indices.numel()} indices")
            self.values.data = new_values
        self.pattern = SparsePattern.from_indices(indices, tuple(weight.shape))
        self._synced_version = None
        self.sync()

    def sync(self) -> None:
        """Write original + values into the base weight if the values changed since last time."""
        version = self.values._version
        if version == self._synced_version:
            return
        with torch.no_grad():
            self.base.weight.view(-1).index_put_(
                (self.indices.long(),),
                added_entries(self.original, self.values, self.original.dtype),
            )
        self._synced_version = self.values._version

    def restore_base(self) -> None:
        """Write the original entries back (bit-exact); the layer must not be used afterwards."""
        with torch.no_grad():
            self.base.weight.view(-1).index_put_((self.indices.long(),), self.original)
        self._synced_version = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base Linear with the delta applied."""
        self.sync()
        weight = self.base.weight
        if weight.requires_grad:  # salience scoring of the current model wants dense grads
            return self.base(x)
        return SparseDeltaFunction.apply(x, weight, self.base.bias, self.values, self.pattern)

    def extra_repr(self) -> str:
        out_f, in_f = self.base.weight.shape
        return f"in_features={in_f}, out_features={out_f}, nnz={self.nnz}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_sparse_deltas(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, SparseDeltaLinear]:
    """Replace each named nn.Linear by a SparseDeltaLinear over its mask; returns them by name."""
    layers: dict[str, SparseDeltaLinear] = {}
    for name, indices in masks.items():
        base = model.get_submodule(name)
        if isinstance(base, SparseDeltaLinear):
            raise ValueError(f"{name} already carries a sparse delta")
        layer = SparseDeltaLinear(base, indices, None if values is None else values.get(name))
        _set_submodule(model, name, layer)
        layers[name] = layer
    return layers


def sparse_delta_layers(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    """The SparseDeltaLinear modules of a model, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def remove_sparse_deltas(
    model: nn.Module, *, merge: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Unwrap every SparseDeltaLinear; returns name -> (indices, values).

    With merge=False the base weights are restored bit for bit; with merge=True they keep
    W + Δ permanently.
    """
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in sparse_delta_layers(model).items():
        layer.sync()
        deltas[name] = (layer.indices.detach().clone(), layer.values.detach().clone())
        if not merge:
            layer.restore_base()
        _set_submodule(model, name, layer.base)
    return deltas
