"""Texts made ready for a served model: cut to a character bound, then tokenised on the caller.

A model reads at most `max_positions` tokens, and no token covers more characters than the
tokenizer's longest vocabulary entry, so a text longer than `max_positions × (longest + 1)`
characters (one separator per token) cannot have all its characters read. `TextEncoder` cuts it
there, at the start of a whitespace run (so the words before the cut tokenise exactly as in
the whole text), before tokenising: a 10 MB input costs what a 10 kB one does. When the cut
text gives fewer tokens than the model reads (whitespace a tokenizer drops, unknown words that
become one token), the bound doubles until the tokens fill the model or the whole text is read,
so the tokens kept are always those of the whole text.

A text the tokenizer cannot encode (a lone surrogate, say) is a ConfigError naming the field.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import ConfigError

T = TypeVar("T")
_LAST_WHITESPACE_RUN = re.compile(r"\s+\S*\Z")


def longest_token_chars(tokenizer: Any) -> int:
    """Characters of the tokenizer's longest vocabulary entry (markers such as ## included)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def cut_text(text: str, limit: int) -> str:
    """`text` itself if it has at most `limit` characters, else a prefix of at most `limit`
    ending before a whitespace run (or exactly `limit` long when the prefix has none)."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    if text[limit].isspace():  # the cut falls in a whitespace run: end before all of it
        return head.rstrip() or head
    run = _LAST_WHITESPACE_RUN.search(head)
    return head[: run.start()] if run is not None and run.start() > 0 else head


class TextEncoder:
    """Tokenises texts for a model of `max_positions` positions, reading only what it can use."""

    def __init__(self, tokenizer: Any, max_positions: int) -> None:
        self.tokenizer, self.max_positions = tokenizer, max_positions
        self.char_bound = max_positions * (longest_token_chars(tokenizer) + 1)

    def encode(self, text: str, tokenize: Callable[[str], T], count: Callable[[T], int], *,
               param: str) -> T:
        """`tokenize(text)` of the whole text, computed from as short a prefix as gives the
        same tokens: prefixes grow until `count` of their tokens reaches `max_positions`."""
        if not isinstance(text, str):
            raise ConfigError(f"{param}: expected a string", param=param)
        limit = self.char_bound
        while True:
            piece = cut_text(text, limit)
            try:
                encoded = tokenize(piece)
            except Exception as err:  # the tokenizer refuses this text: the caller's input
                # (the message never echoes the text: it may not even be encodable as UTF-8)
                raise ConfigError(f"{param}: the tokenizer cannot encode this text "
                                  f"({type(err).__name__}; a lone surrogate such as \\ud800 "
                                  "is not text)", param=param) from err
            if piece is text or count(encoded) >= self.max_positions:
                return encoded
            limit *= 2
