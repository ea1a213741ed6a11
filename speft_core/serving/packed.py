"""Every Linear weight of a served base model in one flat buffer, so a swap is three tensor ops.

At start-up each Linear weight's storage is moved into a slice of one 1-D tensor (`flat`) and the
parameter becomes a view of that slice: no copy stays behind, tied weights stay tied (the shared
parameter is moved once), and the model computes exactly as before. An adapter's entries over
all its modules then become one sorted vector of positions into `flat`, and applying or
restoring it is one index_select / index_copy_ over the whole model instead of one per module.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DeltaMismatchError


@dataclass(frozen=True)
class PackedSlot:
    """Where one module's weight lives in the flat buffer."""

    offset: int
    shape: tuple[int, int]

    @property
    def in_features(self) -> int:
        """Columns of the weight (the length of one row)."""
        return self.shape[1]


class PackedWeights:
    """The flat buffer and, per Linear module name, its weight's slot in it."""

    def __init__(self, model: nn.Module, *, exclude: Collection[str] = ()) -> None:
        linears = {
            name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not _under(name, exclude)
        }
        weights: dict[int, nn.Parameter] = {}
        for module in linears.values():
            weights.setdefault(id(module.weight), module.weight)
        dtypes = {w.dtype for w in weights.values()}
        devices = {w.device for w in weights.values()}
        if len(dtypes) > 1 or len(devices) > 1:
            raise DeltaMismatchError(
                f"cannot serve a model whose Linear weights mix dtypes or devices ({dtypes}, {devices})"
            )
        total = sum(w.numel() for w in weights.values())
        dtype = dtypes.pop() if dtypes else torch.float32
        device = devices.pop() if devices else torch.device("cpu")
        self.flat = torch.empty(total, dtype=dtype, device=device)
        offsets: dict[int, int] = {}
        offset = 0
        with torch.no_grad():
            for key, weight in weights.items():
                piece = self.flat[offset : offset + weight.numel()]
                piece.copy_(weight.reshape(-1))
                weight.data = piece.view(weight.shape)
                offsets[key] = offset
                offset += weight.numel()
        self.slots: dict[str, PackedSlot] = {
            name: PackedSlot(offsets[id(module.weight)], tuple(module.weight.shape))
            for name, module in linears.items()
        }

    def slot(self, module_name: str) -> PackedSlot:
        """The slot of a packed module; DeltaMismatchError if the model has no such Linear."""
        try:
            return self.slots[module_name]
        except KeyError:
            raise DeltaMismatchError(
                f"module {module_name!r} is not a servable Linear of this model"
            ) from None


def _under(name: str, prefixes: Collection[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)
