"""The quality suite's tasks: which model, which data, which split, which protocol.

Classification on MiniLM-L6 (`sst2`, `sst5`, `mpqa`: their own train/dev/test files) and causal
LM on the tiny decoder stories-260k (`tinyshakespeare`: the shared dev file is dev, and 500
speeches held out of the training file are test; `alpaca-chat`: alpaca200's prompt/completion
pairs as user/assistant conversations, split 150 / 25 / 25 with a fixed seed, loss on the
assistant tokens only). Every subsample and split uses seed 0, so every method sees the same
examples in the same order.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speft_core import chat
from speft_core import data as datasets
from speft_core.models import load_tokenizer, resolve_model

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SPEFT_DATA_DIR", REPO.parent / "shared" / "data"))


@dataclass(frozen=True)
class Protocol:
    """Training settings shared by every method on a task."""

    epochs: int = 1
    batch_size: int = 32
    max_length: int = 64
    scoring_examples: int = 512
    train_limit: int | None = 1000  # subsample of the training file (None: all of it)


@dataclass(frozen=True)
class TaskSpec:
    """One task of the suite."""

    name: str
    kind: str  # classification | causal_lm | chat
    model: str
    protocol: Protocol

    @property
    def task(self) -> str:
        """speft_core's task name."""
        return "classification" if self.kind == "classification" else "causal_lm"

    @property
    def is_decoder(self) -> bool:
        return self.task == "causal_lm"


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "classification", "minilm-l6", Protocol()),
    "sst5": TaskSpec("sst5", "classification", "minilm-l6", Protocol()),
    "mpqa": TaskSpec("mpqa", "classification", "minilm-l6", Protocol()),
    "tinyshakespeare": TaskSpec("tinyshakespeare", "causal_lm", "stories-260k",
                                Protocol(train_limit=3000)),
    "alpaca-chat": TaskSpec("alpaca-chat", "chat", "stories-260k",
                            Protocol(epochs=3, batch_size=8, max_length=512,
                                     scoring_examples=150, train_limit=None)),
}
QUICK_LIMITS = {"train": 160, "eval": 64}
HELD_OUT_SPEECHES = 500
CHAT_SPLIT = (150, 25, 25)


@dataclass
class Data:
    """Tokenised splits of a task and what models need to know about them."""

    spec: TaskSpec
    path: Path  # the model folder
    train: list[dict[str, Any]]
    dev: list[dict[str, Any]]
    test: list[dict[str, Any]]
    labels: list[str] | None
    pad_token_id: int

    @property
    def task(self) -> str:
        return self.spec.task


def _subsample(examples: list, limit: int | None) -> list:
    """`limit` examples drawn with seed 0, kept in file order (all when limit is None)."""
    if limit is None or len(examples) <= limit:
        return examples
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))
    return [examples[i] for i in sorted(order[:limit].tolist())]


def _split_examples(spec: TaskSpec) -> tuple[list, list, list]:
    """Raw train / dev / test examples of a task."""
    folder = DATA / spec.name
    if spec.kind == "classification":
        return tuple(datasets.read_jsonl(folder / f"{s}.jsonl", spec.task)
                     for s in ("train", "dev", "test"))
    if spec.name == "tinyshakespeare":
        train = datasets.read_jsonl(folder / "train.jsonl", spec.task)
        return (train[:-HELD_OUT_SPEECHES], datasets.read_jsonl(folder / "dev.jsonl", spec.task),
                train[-HELD_OUT_SPEECHES:])
    pairs = datasets.read_jsonl(DATA / "alpaca200" / "train.jsonl", "causal_lm")
    conversations = [datasets.ChatExample(messages=(
        datasets.ChatMessage(role="user", content=p.prompt),
        datasets.ChatMessage(role="assistant", content=p.completion)), line=p.line)
        for p in pairs]
    order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(0)).tolist()
    a, b, _ = CHAT_SPLIT
    pick = lambda part: [conversations[i] for i in sorted(part)]
    return pick(order[:a]), pick(order[a:a + b]), pick(order[a + b:])


def quick_spec(spec: TaskSpec) -> TaskSpec:
    """The task as `--quick` runs it: one epoch, at most 256 tokens, 32 scoring examples."""
    protocol = spec.protocol
    return dataclasses.replace(spec, protocol=dataclasses.replace(
        protocol, epochs=1, max_length=min(protocol.max_length, 256),
        scoring_examples=min(protocol.scoring_examples, 32)))


def load_task(spec: TaskSpec, *, quick: bool = False) -> Data:
    """Read, split, subsample (seed 0) and tokenise a task's data for its model (`quick`:
    small subsets and `quick_spec`'s protocol)."""
    if quick:
        spec = quick_spec(spec)
    path = resolve_model(spec.model, spec.task).path
    tokenizer = load_tokenizer(path)
    train, dev, test = _split_examples(spec)
    train = _subsample(train, QUICK_LIMITS["train"] if quick else spec.protocol.train_limit)
    if quick:
        dev, test = (_subsample(s, QUICK_LIMITS["eval"]) for s in (dev, test))
    labels = datasets.label_set(train) if spec.task == "classification" else None
    label2id = {label: i for i, label in enumerate(labels)} if labels else None
    max_length = spec.protocol.max_length

    def tokenise(examples: list) -> list[dict[str, Any]]:
        if spec.kind == "chat":
            return chat.tokenize_chat(examples, tokenizer, max_length=max_length).features
        return datasets.tokenize(examples, tokenizer, spec.task, max_length=max_length,
                                 label2id=label2id)

    return Data(spec, path, tokenise(train), tokenise(dev), tokenise(test), labels=labels,
                pad_token_id=tokenizer.pad_token_id)
