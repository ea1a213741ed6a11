"""Which Linear modules SPEFT trains: selection by name patterns."""
from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .errors import TargetsError

# Heads are trained densely (classification) or left frozen (LM head): never sparse targets.
HEAD_NAMES: tuple[str, ...] = ("classifier", "score", "lm_head", "pooler", "qa_outputs", "cls")

# A module inside a repeated block has a numeric path segment: encoder.layer.3.attention.self.query
_IN_BLOCK = re.compile(r"(^|\.)\d+(\.|$)")


def _is_head(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches a module name exactly, as a dotted suffix, or (prefix `re:`) as a regex."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_target_linears(
    model: nn.Module, patterns: Sequence[str] | None = None
) -> dict[str, nn.Linear]:
    """Map qualified name -> nn.Linear for the modules to train, in model order.

    Default (`patterns=None`): every Linear inside a repeated transformer block (attention and
    MLP projections), excluding heads. Otherwise each pattern is a module name, a dotted
    suffix (`query`, `self_attn.q_proj`) or a regex prefixed with `re:`.
    """
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    if patterns is None:
        chosen = {n: m for n, m in linears.items() if _IN_BLOCK.search(n) and not _is_head(n)}
        if not chosen:
            raise TargetsError(
                "no Linear module inside a transformer block was found; pass target_modules",
                param="target_modules",
            )
        return chosen
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise TargetsError(f"bad regex {pattern!r}: {err}", param="target_modules") from err
    chosen = {n: m for n, m in linears.items() if any(_matches(n, p) for p in patterns)}
    unmatched = [p for p in patterns if not any(_matches(n, p) for n in linears)]
    if unmatched:
        examples = ", ".join(list(linears)[:6])
        raise TargetsError(
            f"target pattern {unmatched[0]!r} matches no Linear module (some are: {examples})",
            param="target_modules",
        )
    return chosen
