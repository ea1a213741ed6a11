"""Which Linear modules SPEFT trains: selection by name patterns."""
from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import re2
from torch import nn

from .errors import TargetsError

# Heads are trained densely (classification) or left frozen (LM head): never sparse targets.
HEAD_NAMES: tuple[str, ...] = ("classifier", "score", "lm_head", "pooler", "qa_outputs", "cls")

# Bounds on user-given patterns, checked before any model is loaded (JobSpec, find_target_linears).
MAX_TARGET_PATTERNS = 64
MAX_TARGET_PATTERN_LENGTH = 256
REGEX_PREFIX = "re:"

# A module inside a repeated block has a numeric path segment: encoder.layer.3.attention.self.query
_IN_BLOCK = re.compile(r"(^|\.)\d+(\.|$)")


def _is_head(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


@lru_cache(maxsize=1024)
def _compile(expression: str) -> re2._Regexp:
    """A `re:` pattern's body compiled by RE2: matching takes linear time, never backtracks."""
    options = re2.Options()
    options.log_errors = False  # the error is raised (and reported), not logged to stderr
    try:
        return re2.compile(expression, options)
    except re2.error as err:
        reason = err.args[0].decode(errors="replace") if err.args and isinstance(
            err.args[0], bytes) else str(err)
        raise TargetsError(f"bad regex {REGEX_PREFIX + expression!r}: {reason} (RE2 syntax: no "
                           "backreferences or lookaround)", param="target_modules") from None


def check_target_patterns(patterns: Sequence[str]) -> None:
    """Refuse too many or too long patterns and `re:` bodies RE2 cannot compile (TargetsError)."""
    if len(patterns) > MAX_TARGET_PATTERNS:
        raise TargetsError(f"at most {MAX_TARGET_PATTERNS} target patterns; got {len(patterns)}",
                           param="target_modules")
    for pattern in patterns:
        if len(pattern) > MAX_TARGET_PATTERN_LENGTH:
            raise TargetsError(f"a target pattern is at most {MAX_TARGET_PATTERN_LENGTH} "
                               f"characters; got {len(pattern)} ({pattern[:32]!r}…)",
                               param="target_modules")
        if pattern.startswith(REGEX_PREFIX):
            _compile(pattern[len(REGEX_PREFIX):])


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches a module name exactly, as a dotted suffix, or (prefix `re:`) as a regex."""
    if pattern.startswith(REGEX_PREFIX):
        return _compile(pattern[len(REGEX_PREFIX):]).fullmatch(name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_target_linears(
    model: nn.Module, patterns: Sequence[str] | None = None
) -> dict[str, nn.Linear]:
    """Map qualified name -> nn.Linear for the modules to train, in model order.

    Default (`patterns=None`): every Linear inside a repeated transformer block (attention and
    MLP projections), excluding heads. Otherwise each pattern is a module name, a dotted
    suffix (`query`, `self_attn.q_proj`) or an RE2 regex prefixed with `re:` (full match).
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
    check_target_patterns(patterns)
    chosen = {n: m for n, m in linears.items() if any(_matches(n, p) for p in patterns)}
    unmatched = [p for p in patterns if not any(_matches(n, p) for n in linears)]
    if unmatched:
        examples = ", ".join(list(linears)[:6])
        raise TargetsError(
            f"target pattern {unmatched[0]!r} matches no Linear module (some are: {examples})",
            param="target_modules",
        )
    return chosen
