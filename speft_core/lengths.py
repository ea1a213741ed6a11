"""Sequence lengths: a job's token limit, and texts cut to the characters that limit can hold.

Decisions kept here once:
- A job's examples are at most `effective_max_length` tokens: `max_length` when it is an
  integer; with 'auto' (the default) the model's context (the smaller of the tokenizer's
  `model_max_length` and the model's `max_position_embeddings`, where known), at most MAX_LENGTH
  tokens (the memory cap: the bound an explicit value has too). No example is padded to the
  limit: a batch is as long as its longest example, so a job's sequence length follows its data.
- Texts are cut before tokenisation to a character bound that holds `max_length` tokens
  (`max_length` × the longest token string of the vocabulary), so a huge text costs no more
  than a long one; a cut text that then fills fewer tokens than it needs is tokenised again
  whole, so the tokens kept are those of the whole text (for text whose kept tokens lie within
  the bound: any ordinary text).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import AUTO, MAX_LENGTH
from .errors import ConfigError
from .jsonl import is_int

if TYPE_CHECKING:  # transformers is only needed for the type
    from transformers import PreTrainedTokenizerBase

_FEATURE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def effective_max_length(tokenizer: PreTrainedTokenizerBase, max_length: int | str,
                         positions: int | None = None) -> int:
    """The token limit of a job's examples: `max_length` (a positive integer, or 'auto':
    MAX_LENGTH; anything else is a ConfigError) capped at the model's context, the tokenizer's
    `model_max_length` and `positions` (the model's `max_position_embeddings`) where known."""
    if max_length != AUTO and (not is_int(max_length) or int(max_length) < 1):
        raise ConfigError(f"max_length must be a positive integer or 'auto'; got {max_length!r}",
                          param="max_length")
    limits = [MAX_LENGTH if max_length == AUTO else int(max_length)]
    for context in (getattr(tokenizer, "model_max_length", None), positions):
        if isinstance(context, (int, float)) and not isinstance(context, bool) and context >= 1:
            limits.append(int(context))
    return min(limits)


def char_bound(tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """Characters that hold `max_length` tokens of ordinary text: no token covers more characters
    than the longest token string of the vocabulary (markers such as `##`, `Ġ` only add)."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return max_length * max(longest, 1)


def encode_cut(
    tokenizer: PreTrainedTokenizerBase,
    columns: list[list[str]],
    *,
    bound: int,
    need: int,
    keep_end: bool = False,
    **options: Any,
) -> dict[str, list[list[int]]]:
    """`tokenizer(*columns, **options)` with every text first cut to `bound` characters (its
    start kept, or its end with `keep_end`). A row is encoded again from its whole texts when a
    cut text gives fewer than `need` tokens, or (pairs) when the one cut text gives no more
    tokens than the other text, which would change the side that pair truncation shortens."""
    cut = [[text[-bound:] if keep_end else text[:bound] for text in column] for column in columns]
    encoded = tokenizer(*cut, **options)
    features = {key: [list(row) for row in encoded[key]] for key in _FEATURE_KEYS
                if key in encoded}
    rows = [row for row in range(len(columns[0]))
            if any(len(column[row]) > bound for column in columns)]
    if not rows:
        return features
    counts = [[len(ids) for ids in tokenizer([column[row] for row in rows],
                                             add_special_tokens=False)["input_ids"]]
              for column in cut]
    redo = [row for position, row in enumerate(rows)
            if not _cut_keeps_tokens([len(column[row]) > bound for column in columns],
                                     [count[position] for count in counts], need)]
    if redo:
        again = tokenizer(*[[column[row] for row in redo] for column in columns], **options)
        for key, values in features.items():
            for position, row in enumerate(redo):
                values[row] = list(again[key][position])
    return features


def _cut_keeps_tokens(was_cut: list[bool], counts: list[int], need: int) -> bool:
    """Whether cut texts with these token counts truncate as their whole texts would."""
    if any(cut and count < need for cut, count in zip(was_cut, counts)):
        return False
    if len(counts) == 2 and was_cut.count(True) == 1:
        cut_side = was_cut.index(True)
        return counts[cut_side] > counts[1 - cut_side]
    return True
