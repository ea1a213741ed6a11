"""From salience scores to masks: top-k (global or per layer) and dynamic drop/grow.

Ties are broken deterministically: among equal scores the lower position wins (position =
module order, then flat index). NaN scores rank below every number.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .config import resolve_density
from .delta import index_dtype
from .topk import top_positions


def _topk_positions(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted positions of the k largest entries of a 1-D tensor, ties to the lower position."""
    return top_positions([flat], k)[0]


def _as_indices(positions: torch.Tensor, numel: int) -> torch.Tensor:
    return positions.to(index_dtype(numel))


def select_topk_global(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The k highest-scoring entries over all modules: name -> sorted flat indices.

    The scores are never joined into one tensor (see `speft_core.topk`), so the selection's
    working memory stays a few megabytes however many weights are targeted.
    """
    names = list(scores)
    positions = top_positions([scores[n] for n in names], k)
    return {n: _as_indices(p, scores[n].numel()) for n, p in zip(names, positions)}


def per_layer_counts(sizes: Mapping[str, int], density: float) -> dict[str, int]:
    """Entries per module for per-layer top-k: the same fraction of each, summing to the total."""
    total = sum(sizes.values())
    want = resolve_density(density, total)
    exact = {n: want * s / total for n, s in sizes.items()}
    counts = {n: int(v) for n, v in exact.items()}
    # largest remainder, ties by module order, so counts sum to `want` exactly
    order = sorted(sizes, key=lambda n: -(exact[n] - counts[n]))
    for name in order[: want - sum(counts.values())]:
        counts[name] += 1
    return counts


def select_topk_per_layer(
    scores: Mapping[str, torch.Tensor], density: float
) -> dict[str, torch.Tensor]:
    """The top entries of each module separately, each module getting its share of the budget."""
    counts = per_layer_counts({n: s.numel() for n, s in scores.items()}, density)
    return {
        name: _as_indices(_topk_positions(score.reshape(-1), counts[name]), score.numel())
        for name, score in scores.items()
    }


def select_mask(
    scores: Mapping[str, torch.Tensor], density: float, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """Top-k masks for a density (fraction or count) and scope ('global' or 'layer')."""
    if scope == "layer":
        return select_topk_per_layer(scores, density)
    total = sum(s.numel() for s in scores.values())
    return select_topk_global(scores, resolve_density(density, total))


@dataclass(frozen=True)
class MaskUpdate:
    """A module's new mask after drop/grow; `source[j]` is entry j's old position, -1 if grown."""

    indices: torch.Tensor
    values: torch.Tensor
    source: torch.Tensor


def _entries_to_keep(
    current: Mapping[str, tuple[torch.Tensor, torch.Tensor]], fraction: float, scope: str
) -> dict[str, torch.Tensor]:
    """Which entries to keep: name -> bool mask over its current entries."""
    if scope == "layer":
        return {
            name: _keep_largest(values, values.numel() - round(fraction * values.numel()))
            for name, (_, values) in current.items()
        }
    names = list(current)
    magnitudes = [current[n][1].detach().abs() for n in names]
    total = sum(m.numel() for m in magnitudes)
    n_keep = total - round(fraction * total)
    return {
        name: _positions_to_bool(kept, magnitude.numel())
        for name, magnitude, kept in zip(names, magnitudes, top_positions(magnitudes, n_keep))
    }


def _positions_to_bool(positions: torch.Tensor, numel: int) -> torch.Tensor:
    chosen = torch.zeros(numel, dtype=torch.bool, device=positions.device)
    chosen[positions] = True
    return chosen


def _keep_largest(values: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool mask over `values` keeping the n_keep largest |value| (ties to the lower position)."""
    return _positions_to_bool(_topk_positions(values.detach().abs().reshape(-1), n_keep), values.numel())


def drop_and_grow(
    current: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    scores: Mapping[str, torch.Tensor],
    fraction: float,
    scope: str = "global",
) -> dict[str, MaskUpdate]:
    """Drop the `fraction` of entries with the smallest |value| and grow as many new ones.

    New entries are the highest-scoring weights that were not in the mask before this update
    (so the mask really moves); they start at value 0. Kept entries keep their values.
    With scope 'global' the drop and the grow are ranked over all modules, so a module's
    count can change; with 'layer' each module keeps its count.
    """
    keeps = _entries_to_keep(current, fraction, scope)
    free_scores = {}
    for name, score in scores.items():
        free = score.detach().reshape(-1).float().clone()
        free[current[name][0].long()] = float("-inf")  # only entries outside the old mask grow
        free_scores[name] = free
    n_grow = {n: int((~keeps[n]).sum()) for n in current}
    if scope == "layer":
        grown = {n: _topk_positions(free_scores[n], n_grow[n]) for n in current}
    else:
        grown = {n: i.long() for n, i in select_topk_global(free_scores, sum(n_grow.values())).items()}
    updates: dict[str, MaskUpdate] = {}
    for name, (indices, values) in current.items():
        keep = keeps[name]
        kept_idx = indices.long()[keep]
        new_idx = torch.cat([kept_idx, grown[name].to(kept_idx.device)])
        source = torch.cat([
            keep.nonzero().squeeze(1),
            torch.full((grown[name].numel(),), -1, dtype=torch.int64, device=kept_idx.device),
        ])
        order = torch.argsort(new_idx)
        new_idx, source = new_idx[order], source[order]
        new_values = torch.zeros(new_idx.numel(), dtype=values.dtype, device=values.device)
        old = source >= 0
        new_values[old] = values.detach()[source[old]]
        numel = scores[name].numel()
        updates[name] = MaskUpdate(_as_indices(new_idx, numel), new_values, source)
    return updates
