"""Per-task losses and evaluation: classification and causal LM (loss on completion tokens)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a HF model's forward takes (labels are handled here, not by HF)."""
    return {k: batch[k] for k in _MODEL_INPUTS if k in batch}


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position (N, S-1) and the mask of supervised positions."""
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    losses = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shifted_labels.shape)
    return losses, shifted_labels != IGNORE_INDEX


def example_losses(model: nn.Module, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    """Each example's own loss, shape (N,): what salience metrics differentiate."""
    logits = model(**model_inputs(batch)).logits
    if task == "classification":
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none")
    losses, supervised = _token_losses(logits, batch["labels"])
    return (losses * supervised).sum(1) / supervised.sum(1).clamp(min=1)


def batch_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    """The training loss of a batch: mean over examples, or over supervised tokens for LMs."""
    logits = model(**model_inputs(batch)).logits
    if task == "classification":
        return F.cross_entropy(logits.float(), batch["labels"])
    losses, supervised = _token_losses(logits, batch["labels"])
    return (losses * supervised).sum() / supervised.sum().clamp(min=1)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], task: str
) -> dict[str, float]:
    """eval_loss, and eval_accuracy for classification or, for LMs, eval_perplexity and
    eval_mean_token_accuracy (the share of supervised tokens whose argmax is the label)."""
    was_training = model.training
    model.eval()
    total_loss, total_weight, correct = 0.0, 0, 0
    try:
        for batch in batches:
            logits = model(**model_inputs(batch)).logits
            if task == "classification":
                labels = batch["labels"]
                total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
                correct += int((logits.argmax(-1) == labels).sum())
                total_weight += labels.numel()
            else:
                losses, supervised = _token_losses(logits, batch["labels"])
                total_loss += float((losses * supervised).sum())
                total_weight += int(supervised.sum())
                hits = logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]
                correct += int((hits & supervised).sum())
    finally:
        model.train(was_training)
    if total_weight == 0:
        return {}
    mean = total_loss / total_weight
    if task == "classification":
        return {"eval_loss": mean, "eval_accuracy": correct / total_weight}
    return {"eval_loss": mean, "eval_perplexity": float(torch.exp(torch.tensor(mean))),
            "eval_mean_token_accuracy": correct / total_weight}
