"""Batched text generation for causal LMs: greedy or temperature/top-p, stop strings, streaming.

Prompts are left-padded into one batch and decoded together with the KV cache; each row keeps
its own sampling settings and random generator, and stops on its own (end of sequence, a stop
string, or `max_tokens`). Text is decoded incrementally; a streaming row is sent only text that
can no longer turn into a stop string, so a stop string is never streamed.

Sampling is numerically safe for every admitted setting: a temperature below
`GREEDY_BELOW_TEMPERATURE` decodes greedily, logits are scaled after subtracting their maximum
(no overflow, no NaN), and top-p always keeps the most likely token. A row whose sampling,
decoding or streaming raises ends alone with that error; the other rows go on.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"  # the row's on_text returned False (e.g. its client went away)
FINISH_ERROR = "error"  # the row's sampling, decoding or streaming raised (its error is returned)
# Below this a softmax is one-hot to float precision anyway: decode greedily instead of dividing.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: temperature 0 (or below 1e-5) is greedy; top_p in (0, 1].

    Checked on construction (ConfigError naming the field), so a bad value fails its own
    request before it is queued, never the batch it would have joined.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # besides eos (a chat template's end-of-turn token)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or (
                self.max_tokens < 1):
            raise ConfigError("max_tokens must be a positive integer", param="max_tokens")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ConfigError("temperature must be a finite number ≥ 0", param="temperature")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError("top_p must be in (0, 1]", param="top_p")
        if not all(isinstance(s, str) for s in self.stop):
            raise ConfigError("stop strings must be strings", param="stop")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise ConfigError(f"seed must be an integer in [0, {MAX_SEED}]", param="seed")

    @property
    def greedy(self) -> bool:
        """Whether this request decodes greedily (argmax, no random generator)."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE


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
    error: Exception | None = None

    def fail(self, error: Exception) -> None:
        """End this row with `error` (the other rows go on)."""
        self.error, self.finish_reason = error, FINISH_ERROR


def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    params: Sequence[SamplingParams],
    on_text: Sequence[Callable[[str], bool | None] | None] | None = None,
) -> list[Completion | Exception]:
    """Decode every prompt (token ids) together; `on_text[i]` receives row i's text as it grows.

    A callback returning False stops its row (finish reason `cancelled`); the others go on.
    A row whose sampling, decoding or callback raises gets that exception in its place.
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
        next_ids = _step(out.logits[:, -1].float(), rows, tokenizer)
        if all(r.finish_reason is not None for r in rows):
            break
        input_ids = torch.tensor(next_ids, device=device).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
    for row in rows:
        if row.finish_reason is None:
            row.finish_reason = FINISH_LENGTH
        if row.error is None:
            try:
                _send(row, len(row.text))
            except Exception as err:  # noqa: BLE001  # this row's callback, not the batch's
                row.fail(err)
    return [r.error if r.error is not None else
            Completion(r.text, r.finish_reason or FINISH_LENGTH, len(r.prompt_ids), len(r.tokens))
            for r in rows]


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def _step(logits: torch.Tensor, rows: Sequence[_Row], tokenizer) -> list[int]:
    """Choose and add each live row's next token; a row that raises ends alone (`fail`).
    Returns a next input token for every row (finished rows are fed their argmax, unused)."""
    chosen = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        if row.finish_reason is not None:
            continue
        try:
            if row.generator is not None:
                chosen[i] = _sample(logits[i], row.params.temperature, row.params.top_p,
                                    row.generator)
            _advance(row, chosen[i], tokenizer)
        except Exception as err:  # noqa: BLE001  # this row's own failure, not the batch's
            row.fail(err)
    return chosen


def _sample(logits: torch.Tensor, temperature: float, top_p: float,
            generator: torch.Generator) -> int:
    """A token drawn from softmax(logits / temperature) restricted to the top-p nucleus.

    Safe for any temperature ≥ GREEDY_BELOW_TEMPERATURE and any top_p in (0, 1]: NaN logits are
    never drawn, the maximum is subtracted before scaling (every scaled logit ≤ 0, the best one
    exactly 0, so the softmax neither overflows nor divides by zero), and the nucleus always
    holds the most likely token.
    """
    logits = torch.nan_to_num(logits, nan=-math.inf, posinf=torch.finfo(logits.dtype).max)
    best = logits.max()
    if not torch.isfinite(best):
        raise FloatingPointError("the model gave no finite logit for this row")
    probs = torch.softmax((logits - best) / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        outside[0] = False  # the most likely token is always in the nucleus
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _advance(row: _Row, token: int, tokenizer) -> None:
    """Add one token to a row: stop at end of sequence (eos or a stop token), a stop string or
    max_tokens."""
    if token == tokenizer.eos_token_id or token in row.params.stop_token_ids:
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
