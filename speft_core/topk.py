"""Exact top-k over many tensors at once, without concatenating them.

Global top-k over every targeted matrix of a 1B model means ranking ~10⁹ scores. Joining them
into one fp32 tensor and calling ``torch.topk`` holds ~24 bytes a score (the joined copy, a
NaN-cleaned copy, the top-k values and int64 positions, boolean masks): ~18 GiB at 822M
scores. This module finds the k-th largest score by a radix select on an order-preserving
32-bit key instead: one histogram over the keys' high 16 bits, one over the low 16 bits of
the bucket the k-th score falls into, then one pass that picks the positions. Every pass
walks the tensors in chunks of at most ``CHUNK`` elements, so working memory is a few
megabytes whatever the total; only the chosen positions are allocated.

Order: NaN ranks below every number, -0.0 equals +0.0, and +inf ties with the largest finite
float (as ``torch.nan_to_num`` maps them). Ties at the threshold go to the lower position:
earlier tensor first, then lower flat index.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

CHUNK = 1 << 20
_DIGITS = 1 << 16
_HALF = 1 << 15


def _chunks(flat: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, flat.numel(), CHUNK):
        yield start, flat[start:start + CHUNK]


def _keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys whose signed order is the scores' order (see the module docstring)."""
    clean = torch.nan_to_num(scores.detach().float(), nan=float("-inf")) + 0.0  # -0.0 -> +0.0
    bits = clean.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _histogram(tensors: Sequence[torch.Tensor], high: int | None) -> torch.Tensor:
    """Counts of the keys' high 16 bits, or of the low 16 bits among keys whose high is `high`."""
    device = tensors[0].device
    counts = torch.zeros(_DIGITS, dtype=torch.int64, device=device)
    for tensor in tensors:
        for _, chunk in _chunks(tensor.reshape(-1)):
            key = _keys(chunk)
            if high is None:
                digit = (key >> 16) + _HALF
            else:
                digit = key[(key >> 16) == high] & 0xFFFF
            counts += torch.bincount(digit.long(), minlength=_DIGITS)
    return counts


def _digit_of_kth(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The digit the k-th largest key has, and how many keys have a larger digit."""
    from_top = counts.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor(k, device=counts.device)))
    digit = _DIGITS - 1 - i
    return digit, int(from_top[i]) - int(counts[digit])


def kth_largest_key(tensors: Sequence[torch.Tensor], k: int) -> tuple[int, int]:
    """The key of the k-th largest score (1 ≤ k ≤ total) and how many keys equal to it to take."""
    high_digit, above_high = _digit_of_kth(_histogram(tensors, None), k)
    high = high_digit - _HALF
    low, above_low = _digit_of_kth(_histogram(tensors, high), k - above_high)
    return high * _DIGITS + low, k - above_high - above_low


def top_positions(tensors: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """For each tensor, the sorted flat int64 positions of its entries among the k largest of all."""
    sizes = [t.numel() for t in tensors]
    devices = [t.device for t in tensors]
    if k >= sum(sizes):
        return [torch.arange(n, device=d) for n, d in zip(sizes, devices)]
    if k <= 0:
        return [torch.zeros(0, dtype=torch.int64, device=d) for d in devices]
    threshold, ties_left = kth_largest_key(tensors, k)
    chosen: list[torch.Tensor] = []
    for tensor in tensors:
        parts = [torch.zeros(0, dtype=torch.int64, device=tensor.device)]
        for start, chunk in _chunks(tensor.reshape(-1)):
            key = _keys(chunk)
            picked = key > threshold
            if ties_left > 0:
                equal = (key == threshold).nonzero().squeeze(1)[:ties_left]
                picked[equal] = True
                ties_left -= equal.numel()
            parts.append(picked.nonzero().squeeze(1) + start)
        chosen.append(torch.cat(parts))
    return chosen
