"""Top-k with a cap on every row and column of a module (`SpeftConfig.spread_cap`).

Summed gradients are close to an outer product, Σg ≈ a bᵀ, so a plain top-k of |Σg| is a
block: the rows with the largest |a| times the columns with the largest |b|. On MiniLM a
module's chosen entries then sit two thirds in 5% of its input features. Capping each row at
ceil(cap · fraction · columns) entries and each column at ceil(cap · fraction · rows) keeps the
choice salience-ordered but spread.

The selection runs in passes. Each pass ranks every untaken entry within its row (over columns
with room left) and within its column (over rows with room left); an entry that is within its
row's room and its column's room is a candidate, and the global top of the candidates is taken.
Taking every candidate of a pass stays within every cap, so only the budget limits a pass.
Passes repeat until the budget is met, no candidate is left, or `MAX_PASSES`; what is still
missing is the caller's to fill (`choose_mask` draws it at random). Each pass sorts every module
along both axes, so it holds about three int64 copies of the largest module's scores.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .topk import top_positions

MAX_PASSES = 32
_LOWEST = float("-inf")


class _Lines:
    """One module's scores and how much room each of its rows and columns has left."""

    def __init__(self, score: torch.Tensor, fraction: float, cap: float, lines: str) -> None:
        self.ranked = torch.nan_to_num(score.detach().float(), nan=_LOWEST, neginf=_LOWEST)
        if self.ranked.dim() != 2:  # no rows and columns to spread over: one uncapped line
            self.ranked = self.ranked.reshape(1, -1)
            room = (self.ranked.shape[1], 1)
        else:
            rows, cols = self.ranked.shape
            room = (math.ceil(cap * fraction * cols) if lines != "inputs" else cols,
                    math.ceil(cap * fraction * rows) if lines != "outputs" else rows)
        device = self.ranked.device
        self.taken = torch.zeros_like(self.ranked, dtype=torch.bool)
        self.row_room = torch.full((self.ranked.shape[0],), room[0], device=device)
        self.col_room = torch.full((self.ranked.shape[1],), room[1], device=device)

    def candidates(self) -> torch.Tensor:
        """The scores of this pass's candidates, every other entry at -inf."""
        closed = (self.taken | (self.row_room == 0)[:, None] | (self.col_room == 0)[None, :])
        live = self.ranked.masked_fill(closed, _LOWEST)
        within = (_rank_along(live, dim=1) < self.row_room[:, None]) & (
            _rank_along(live, dim=0) < self.col_room[None, :])
        return live.masked_fill(~within, _LOWEST)

    def take(self, positions: torch.Tensor) -> None:
        cols = self.ranked.shape[1]
        self.taken.view(-1)[positions] = True
        self.row_room -= torch.bincount(positions // cols, minlength=self.ranked.shape[0])
        self.col_room -= torch.bincount(positions % cols, minlength=cols)


def _rank_along(score: torch.Tensor, *, dim: int) -> torch.Tensor:
    """Each entry's rank within its line along `dim` (0 = largest; ties to the lower position)."""
    order = torch.sort(score, dim=dim, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    steps = torch.arange(score.shape[dim], device=score.device)
    shape = [1, 1]
    shape[dim] = -1
    return ranks.scatter_(dim, order, steps.view(shape).expand_as(order))


def capped_top(scores: Mapping[str, torch.Tensor], want: int, *, fraction: float,
               cap: float, lines: str = "both") -> dict[str, torch.Tensor]:
    """Up to `want` entries over all modules, in passes of global top-k, no row or column past
    its cap (see the module docstring; `lines` 'inputs' caps the columns only, 'outputs' the
    rows only): name -> sorted flat int64 positions. Fewer than `want` only when the caps (or
    -inf / NaN scores) leave no candidate."""
    names = list(scores)
    room = {n: _Lines(scores[n], fraction, cap, lines) for n in names}
    chosen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    left = want
    for _ in range(MAX_PASSES):
        if left <= 0:
            break
        candidates = [room[n].candidates() for n in names]
        available = sum(int(torch.isfinite(c).sum()) for c in candidates)
        if available == 0:
            break
        for name, positions in zip(names, top_positions(candidates, min(left, available))):
            room[name].take(positions)
            chosen[name].append(positions)
            left -= int(positions.numel())
    return {n: torch.sort(torch.cat(chosen[n])).values if chosen[n]
            else torch.zeros(0, dtype=torch.int64, device=scores[n].device) for n in names}
