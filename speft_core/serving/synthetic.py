"""Synthetic deltas of a given density for a base model: benchmarks and tests of serving.

Random entries and values, but a real delta in every other respect (sorted indices of the right
dtype, the base's fingerprint, full metadata, a head for classification), so it loads, verifies
and serves exactly like a trained one.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch import nn

from ..delta import Delta, fingerprint, index_dtype
from ..models import classification_head
from ..targets import find_target_linears


def random_delta(
    model: nn.Module, *, density: float, seed: int, labels: Sequence[str] = (),
    base_model: str = "base", scale: float = 0.05, target_modules: Sequence[str] | None = None,
) -> Delta:
    """A delta over `density` of each targeted weight; a classification head when `labels`."""
    generator = torch.Generator().manual_seed(seed)
    targets = find_target_linears(model, target_modules)
    modules = {}
    for name, linear in targets.items():
        numel = linear.weight.numel()
        k = max(1, int(numel * density))
        indices = torch.randperm(numel, generator=generator)[:k].sort().values
        modules[name] = (indices.to(index_dtype(numel)),
                         torch.randn(k, generator=generator, dtype=linear.weight.dtype) * scale)
    extras = {}
    if labels:
        for name, param in classification_head(model).items():  # (labels, hidden) and (labels,)
            shape = (len(labels), *param.shape[1:])
            extras[name] = torch.randn(shape, generator=generator, dtype=param.dtype)
    metadata = {
        "base_model": base_model, "base_fingerprint": fingerprint(model, targets),
        "metric": "random", "density": str(density),
        "task": "classification" if labels else "causal_lm", "labels": json.dumps(list(labels)),
    }
    return Delta(modules=modules, extras=extras, metadata=metadata)
