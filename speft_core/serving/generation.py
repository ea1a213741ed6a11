"""Batched text generation for causal LMs: greedy or temperature/top-p, stop strings, streaming.

Prompts are left-padded into one batch and decoded together with the KV cache; each row keeps
its own sampling settings and random generator, and stops on its own (end of sequence, a stop
string, or `max_tokens`). Text is decoded incrementally; a streaming row is sent only text that
can no longer turn into a stop string, so a stop string is never streamed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"  # the row's on_text returned False (e.g. its client went away)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: temperature 0 is greedy; top_p in (0, 1]."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    """One request's generated text and why it ended."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class _Row:
    """A row's decoding state."""

    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], bool | None] | None
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already streamed
    text: str = ""
    finish_reason: str | None = None


def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    params: Sequence[SamplingParams],
    on_text: Sequence[Callable[[str], bool | None] | None] | None = None,
) -> list[Completion]:
    """Decode every prompt (token ids) together; `on_text[i]` receives row i's text as it grows.

    A callback returning False stops its row (finish reason `cancelled`); the others go on.
    """
    device = next(model.parameters()).device
    rows = [_Row(list(p), s, cb, _generator(s, device))
            for p, s, cb in zip(prompts, params, on_text or [None] * len(prompts), strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r.prompt_ids) for r in rows)
    input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows],
                             device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids)
                         for r in rows], device=device)
    past = None
    for _ in range(max(r.params.max_tokens for r in rows)):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        next_ids = _choose(out.logits[:, -1].float(), rows)
        for row, token in zip(rows, next_ids, strict=True):
            if row.finish_reason is None:
                _advance(row, token, tokenizer)
        if all(r.finish_reason is not None for r in rows):
            break
        input_ids = torch.tensor(next_ids, device=device).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
    for row in rows:
        if row.finish_reason is None:
            row.finish_reason = FINISH_LENGTH
        _send(row, len(row.text))
    return [Completion(r.text, r.finish_reason or FINISH_LENGTH, len(r.prompt_ids), len(r.tokens))
            for r in rows]


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def _choose(logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
    """Next token per row: argmax where greedy, else a sample from the top-p nucleus."""
    chosen = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        if row.generator is None or row.finish_reason is not None:
            continue
        probs = torch.softmax(logits[i] / row.params.temperature, -1)
        if row.params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= row.params.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        chosen[i] = int(torch.multinomial(probs, 1, generator=row.generator))
    return chosen


def _advance(row: _Row, token: int, tokenizer) -> None:
    """Add one token to a row: stop at end of sequence, a stop string or max_tokens."""
    if token == tokenizer.eos_token_id:
        row.finish_reason = FINISH_STOP
        return
    row.tokens.append(token)
    row.text = tokenizer.decode(row.tokens, skip_special_tokens=True)
    stops = [i for i in (row.text.find(s, max(0, row.sent - len(s))) for s in row.params.stop
                         if s) if i >= 0]
    if stops:
        row.text = row.text[: min(stops)]
        row.finish_reason = FINISH_STOP
    elif len(row.tokens) >= row.params.max_tokens:
        row.finish_reason = FINISH_LENGTH
    if row.finish_reason is None:
        hold = max((len(s) - 1 for s in row.params.stop), default=0)
        safe = len(row.text) - hold
        while safe > row.sent and row.text[safe - 1] == "\ufffd":  # an incomplete character
            safe -= 1
        _send(row, safe)


def _send(row: _Row, upto: int) -> None:
    if row.on_text is not None and upto > row.sent:
        if row.on_text(row.text[row.sent : upto]) is False:
            row.finish_reason = FINISH_CANCELLED
    row.sent = max(row.sent, upto)
