"""Running one batch on a served base model under the swap path or the mixed-batch path.

- swap (`ServedModel.swapped`): the adapter's entries are written into the packed weights
  (`index_copy_`), the batch runs as a plain forward, and the saved original entries are written
  back, bit for bit, never by subtraction.
- mixed (`ServedModel.segments(..., mixed=True)`): the batch's rows are grouped into contiguous
  segments, one adapter each. No weight changes: a forward hook on every Linear adds each
  segment's own x·Δᵀ to that segment's output rows, in one kernel call per module
  (`kernels.segment_sparse_add`).
In both paths a classification head runs per segment with that segment's adapter head.
Only the thread that runs batches may call these; the caller serialises them.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..delta import added_entries, fingerprint
from ..errors import ConfigError
from ..kernels import SegmentPlan, segment_sparse_add
from ..models import classification_head
from .adapter import ServingAdapter
from .packed import PackedWeights


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of a batch, served with `adapter` (None: the base model)."""

    start: int
    stop: int
    adapter: ServingAdapter | None


class _SegmentedHead(nn.Module):
    """Runs the wrapped head once per segment with that segment's head parameters."""

    def __init__(self, inner: nn.Module, owner: ServedModel) -> None:
        super().__init__()
        self.inner = inner
        self._owner = [owner]  # a list: not registered as a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        outputs = []
        for segment in self._owner[0].active_segments:
            if segment.adapter is None or not segment.adapter.head:
                raise ConfigError("classification needs an adapter with a trained head",
                                  param="adapter")
            outputs.append(functional_call(self.inner, dict(segment.adapter.head),
                                           (hidden[segment.start : segment.stop],)))
        width = max(o.shape[-1] for o in outputs)
        return torch.cat([F.pad(o, (0, width - o.shape[-1]), value=float("-inf"))
                          for o in outputs])


class ServedModel:
    """A base model prepared for per-request adapters: packed weights, hooks, segmented head."""

    def __init__(self, model: nn.Module, task: str) -> None:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.task = model, task
        self.head_prefix: str | None = None
        if task == "classification":
            self.head_prefix = next(iter(classification_head(model))).split(".")[0]
            setattr(model, self.head_prefix,
                    _SegmentedHead(getattr(model, self.head_prefix), self))
        self.packed = PackedWeights(model, exclude=[self.head_prefix] if self.head_prefix else [])
        self.active_segments: Sequence[Segment] = ()
        self._plans: dict[str, SegmentPlan] = {}
        self._fingerprints: dict[tuple[str, ...], str] = {}
        for name in self.packed.slots:
            model.get_submodule(name).register_forward_hook(partial(self._add_deltas, name))

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.packed.flat.device

    def base_fingerprint(self, module_names: Sequence[str]) -> str:
        """The base fingerprint over these modules (memoised; call only between batches)."""
        key = tuple(sorted(set(module_names)))
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint(self.model, key)
        return self._fingerprints[key]

    @contextlib.contextmanager
    def swapped(self, adapter: ServingAdapter | None) -> Iterator[None]:
        """Write the adapter's entries into the weights; restore the saved originals on exit."""
        if adapter is None or adapter.nnz == 0:
            yield
            return
        flat = self.packed.flat
        original = flat.index_select(0, adapter.positions)
        try:
            # index_copy_: positions are unique, and it beats index_put_ by ~1.5× here
            flat.index_copy_(0, adapter.positions,
                             added_entries(original, adapter.added, flat.dtype))
            yield
        finally:
            flat.index_copy_(0, adapter.positions, original)

    @contextlib.contextmanager
    def segments(self, segments: Sequence[Segment], *, mixed: bool) -> Iterator[None]:
        """Declare the batch's segments (for the head) and, when `mixed`, add their deltas."""
        self.active_segments = segments
        self._plans = self._plan(segments) if mixed else {}
        try:
            yield
        finally:
            self.active_segments, self._plans = (), {}

    def _plan(self, segments: Sequence[Segment]) -> dict[str, SegmentPlan]:
        """Per module, every segment's entries concatenated once for the whole batch."""
        names = {n for s in segments if s.adapter is not None for n in s.adapter.modules}
        return {name: SegmentPlan.build([
            (s.start, s.stop, s.adapter.modules.get(name) if s.adapter is not None else None)
            for s in segments]) for name in names}

    def _add_deltas(self, name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...],
                    output: torch.Tensor) -> None:
        """Forward hook: each segment's rows get their own adapter's x·Δᵀ for this module."""
        plan = self._plans.get(name)
        if plan is not None:
            segment_sparse_add(inputs[0], output, plan)
