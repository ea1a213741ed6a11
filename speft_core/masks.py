"""From salience scores to masks: top-k (global or per layer) and dynamic drop/grow.

Ties are broken deterministically: among equal scores the lower position wins (position =
module order, then flat index). NaN scores rank below every number.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .config import SpeftConfig, resolve_density
from .delta import index_dtype
from .spread import capped_top
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
    return _shares(sizes, resolve_density(density, sum(sizes.values())))


def _shares(sizes: Mapping[str, int], want: int) -> dict[str, int]:
    """`want` entries split over modules in proportion to their sizes, summing to `want`."""
    total = sum(sizes.values())
    if total == 0:
        return dict.fromkeys(sizes, 0)
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
    return {name: _as_indices(p, scores[name].numel())
            for name, p in _per_module_top(scores, counts).items()}


def _per_module_top(scores: Mapping[str, torch.Tensor],
                    counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
    return {name: _topk_positions(score.reshape(-1), counts[name])
            for name, score in scores.items()}


def select_mask(
    scores: Mapping[str, torch.Tensor], density: float, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """Top-k masks for a density (fraction or count) and scope ('global' or 'layer')."""
    if scope == "layer":
        return select_topk_per_layer(scores, density)
    total = sum(s.numel() for s in scores.values())
    return select_topk_global(scores, resolve_density(density, total))


def choose_mask(scores: dict[str, torch.Tensor], speft: SpeftConfig, *,
                seed: int, task: str | None = None) -> dict[str, torch.Tensor]:
    """The static mask a SPEFT config asks for, from its salience scores (which it consumes:
    they are normalised and excluded in place).

    The budget k = `density` of the targeted weights is split three ways: `module_floor` of the
    salience part goes to every module in proportion to its size (each module's own top
    entries), the rest of it to the global (or, with scope 'layer', per-module) top-k of what
    is left, and `explore_fraction` of k to uniformly random entries outside both (seeded).
    With `score_normalization: module` each module's scores are first divided by their mean;
    with a spread cap (`SpeftConfig.spread_cap_for(task)`) the salience part keeps every row
    and column of a module within its cap (`speft_core.spread`), and whatever the caps leave
    unfilled is drawn at random too.
    """
    sizes = {n: s.numel() for n, s in scores.items()}
    k = resolve_density(speft.density, sum(sizes.values()))
    if speft.score_normalization == "module":
        normalise_per_module(scores)
    salience_k = k - round(speft.explore_fraction * k)
    cap = speft.spread_cap_for(task)
    if cap:
        spread = {"fraction": k / sum(sizes.values()), "cap": cap, "lines": speft.spread_lines}
        if speft.scope == "layer":
            shares = _shares(sizes, salience_k)
            chosen = {n: capped_top({n: scores[n]}, shares[n], **spread)[n] for n in sizes}
        else:
            chosen = capped_top(scores, salience_k, **spread)
    elif speft.scope == "layer":
        chosen = _per_module_top(scores, _shares(sizes, salience_k))
    else:
        floor_k = round(speft.module_floor * salience_k)
        floor = _per_module_top(scores, _shares(sizes, floor_k))
        for name, positions in floor.items():
            scores[name].view(-1)[positions] = float("-inf")
        rest = top_positions([scores[n] for n in sizes], salience_k - floor_k)
        chosen = {n: torch.unique(torch.cat([floor[n], r.to(floor[n].device)]))
                  for n, r in zip(sizes, rest)}
    chosen = _add_random(chosen, sizes, k - sum(int(c.numel()) for c in chosen.values()),
                         torch.Generator().manual_seed(seed))
    return {n: _as_indices(chosen[n], sizes[n]) for n in sizes}


def normalise_per_module(scores: dict[str, torch.Tensor]) -> None:
    """Divide each module's scores (in place) by their mean |score|, NaN ignored."""
    for score in scores.values():
        mean = torch.nan_to_num(score.float().abs(), nan=0.0, posinf=0.0).mean()
        if float(mean) > 0:
            score.div_(mean.to(score.dtype))


def _add_random(chosen: dict[str, torch.Tensor], sizes: Mapping[str, int], count: int,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`chosen` plus `count` uniformly random positions not in it (sorted per module)."""
    if count <= 0:
        return chosen
    names = list(sizes)
    offsets = torch.tensor([0, *sizes.values()]).cumsum(0)
    taken = torch.cat([chosen[n].cpu() + offsets[i] for i, n in enumerate(names)]).sort().values
    total = int(offsets[-1])
    if total - taken.numel() <= 4 * count:  # dense: draw from the exact complement
        free = torch.ones(total, dtype=torch.bool)
        free[taken] = False
        free_positions = free.nonzero().squeeze(1)
        added = free_positions[torch.randperm(free_positions.numel(), generator=generator)[:count]]
    else:  # sparse: rejection sampling, a few rounds at most
        added = torch.zeros(0, dtype=torch.int64)
        while added.numel() < count:
            want = count - added.numel()
            draw = torch.unique(torch.randint(0, total, (2 * want + 16,), generator=generator))
            draw = draw[torch.randperm(draw.numel(), generator=generator)]
            if taken.numel():
                at = torch.searchsorted(taken, draw).clamp(max=taken.numel() - 1)
                draw = draw[taken[at] != draw]
            added = torch.cat([added, draw[:want]])
            taken = torch.cat([taken, draw[:want]]).sort().values
    result = {}
    for i, name in enumerate(names):
        mine = added[(added >= offsets[i]) & (added < offsets[i + 1])] - offsets[i]
        result[name] = torch.cat([chosen[name], mine.to(chosen[name].device)]).sort().values
    return result


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
    *,
    consume_scores: bool = False,
) -> dict[str, MaskUpdate]:
    """Drop the `fraction` of entries with the smallest |value| and grow as many new ones.

    New entries are the highest-scoring weights that were not in the mask before this update
    (so the mask really moves); they start at value 0. Kept entries keep their values.
    With scope 'global' the drop and the grow are ranked over all modules, so a module's
    count can change; with 'layer' each module keeps its count. With `consume_scores` the
    old mask's positions in `scores` are overwritten instead of copying every module's scores
    (the caller's scores are then spent: a copy of a whole model's worth saved at LLM scale).
    """
    keeps = _entries_to_keep(current, fraction, scope)
    free_scores = {}
    for name, score in scores.items():
        free = score.detach().reshape(-1)
        if not consume_scores:
            free = free.clone()
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
