"""A delta made ready to serve on one base model: swap positions, per-module entries, a head.

A `ServingAdapter` holds each adapter twice over the same k entries, in the two layouts the two
execution paths need (both built once, at load):
- `positions`/`added`: sorted positions into the packed weight buffer and the values to add there,
  in the dtype `apply_delta` adds in (so a swap gives bit for bit the merged model);
- `modules`: per module, the entries by row (CSR over used rows) in the weight dtype, for the
  mixed batch's x·Δᵀ.
A classification adapter also carries its dense head (the delta's extras), keyed by the head
module's own parameter names.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..delta import Delta
from ..errors import ConfigError, DeltaMismatchError
from ..kernels import RowEntries
from .packed import PackedWeights


@dataclass(eq=False)
class ServingAdapter:
    """An adapter resident in memory, ready for the swap and mixed-batch paths."""

    key: str
    task: str
    labels: list[str]
    positions: torch.Tensor  # (K,) int64, sorted, unique positions into PackedWeights.flat
    added: torch.Tensor  # (K,) values added at `positions`, in the promoted dtype
    modules: dict[str, RowEntries]
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # head param name -> tensor
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        """Number of sparse entries."""
        return int(self.positions.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of tensor memory this adapter holds (what the cache budget counts)."""
        tensors = [self.positions, self.added, *self.head.values()]
        return (sum(t.numel() * t.element_size() for t in tensors)
                + sum(entries.nbytes for entries in self.modules.values()))


def prepare_adapter(
    delta: Delta, packed: PackedWeights, *, key: str, task: str, head_prefix: str | None
) -> ServingAdapter:
    """Lay out a (verified) delta for serving on the packed base; refuse what cannot be served."""
    if delta.metadata.get("task", task) != task:
        raise DeltaMismatchError(
            f"trained for task {delta.metadata['task']!r}; this model serves {task!r}",
            param="adapter"
        )
    flat = packed.flat
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (indices, values) in delta.modules.items():
        slot = packed.slot(name)
        parts[name] = (indices.to(device=flat.device, dtype=torch.long) + slot.offset,
                       values.to(flat.device))
    return _build(key, task, delta.labels, parts, packed,
                  head=_head_tensors(delta, head_prefix, flat.device),
                  metadata=dict(delta.metadata))


def compose_adapters(
    parts: Sequence[tuple[ServingAdapter, float]], packed: PackedWeights, *, key: str
) -> ServingAdapter:
    """One adapter whose delta is Σ weight·delta (heads: the weight-normalised average)."""
    if not parts:
        raise ConfigError("compose at least one adapter", param="adapter")
    first = parts[0][0]
    for adapter, weight in parts:
        if adapter.task != first.task:
            raise ConfigError("composed adapters must share a task", param="adapter")
        if adapter.labels != first.labels:
            raise ConfigError(
                f"composed classification adapters must share labels: {adapter.key!r} has "
                f"{adapter.labels}, {first.key!r} has {first.labels}", param="adapter")
        if not math.isfinite(weight):
            raise ConfigError("adapter weights must be finite numbers", param="adapter")
    dtype = first.added.dtype
    positions = torch.cat([a.positions for a, _ in parts])
    values = torch.cat([a.added.to(dtype) * w for a, w in parts])
    unique, inverse = torch.unique(positions, sorted=True, return_inverse=True)
    summed = torch.zeros(unique.numel(), dtype=dtype, device=values.device)
    summed.index_add_(0, inverse, values)
    return _build(key, first.task, first.labels, {"": (unique, summed)}, packed,
                  head=_average_heads(parts), metadata={"composed_of": key})


def _build(
    key: str, task: str, labels: list[str], parts: dict[str, tuple[torch.Tensor, torch.Tensor]],
    packed: PackedWeights, *, head: dict[str, torch.Tensor], metadata: dict[str, str],
) -> ServingAdapter:
    """Both layouts from global positions and values (any grouping of `parts`)."""
    flat = packed.flat
    if parts:
        positions = torch.cat([p for p, _ in parts.values()])
        values = torch.cat([v for _, v in parts.values()])
    else:
        positions = torch.zeros(0, dtype=torch.long, device=flat.device)
        values = torch.zeros(0, dtype=flat.dtype, device=flat.device)
    order = torch.argsort(positions)
    positions, values = positions[order], values[order]
    common = torch.promote_types(flat.dtype, values.dtype)
    return ServingAdapter(
        key=key, task=task, labels=list(labels), positions=positions, added=values.to(common),
        modules=_module_entries(positions, values.to(flat.dtype), packed),
        head=head, metadata=metadata,
    )


def _module_entries(
    positions: torch.Tensor, values: torch.Tensor, packed: PackedWeights
) -> dict[str, RowEntries]:
    """Split sorted global positions back into each module's (rows, cols, values); modules
    sharing one weight (tied) get the entries once, under the first name."""
    entries: dict[str, RowEntries] = {}
    split: set[int] = set()  # offsets already split
    for name, slot in packed.slots.items():
        size = slot.shape[0] * slot.shape[1]
        lo = int(torch.searchsorted(positions, slot.offset))
        hi = int(torch.searchsorted(positions, slot.offset + size))
        if lo == hi or slot.offset in split:
            continue
        split.add(slot.offset)
        local = positions[lo:hi] - slot.offset
        entries[name] = RowEntries.from_rows(local // slot.in_features, local % slot.in_features,
                                             values[lo:hi])
    return entries


def _head_tensors(
    delta: Delta, head_prefix: str | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """The delta's extras as head parameters; extras elsewhere cannot be served per request."""
    head: dict[str, torch.Tensor] = {}
    for name, tensor in delta.extras.items():
        if head_prefix is None or not name.startswith(head_prefix + "."):
            raise DeltaMismatchError(
                f"a dense tensor {name!r} lies outside the classification head; only "
                "sparse entries and the head can be served per request",
                param="adapter")
        head[name[len(head_prefix) + 1 :]] = tensor.to(device)
    if head_prefix is not None and not head:
        raise DeltaMismatchError(
            f"no classification head ({head_prefix}.*) in the delta", param="adapter")
    return head


def _average_heads(parts: Sequence[tuple[ServingAdapter, float]]) -> dict[str, torch.Tensor]:
    heads = [(a.head, w) for a, w in parts if a.head]
    if not heads:
        return {}
    total = sum(w for _, w in heads)
    if total == 0:
        raise ConfigError("adapter weights of classification adapters must not sum to 0",
                          param="adapter")
    return {name: sum(h[name] * (w / total) for h, w in heads) for name in heads[0][0]}
