"""Checkpoints inside a run: their schedule, the best one kept, early stopping, and resuming
from a saved training state exactly where the run stood."""
from __future__ import annotations

import pytest
import torch

from speft_core import train as train_module
from speft_core.checkpoint import checkpoint_steps, state_from_bytes, state_to_bytes
from speft_core.config import SpeftConfig, TrainConfig
from speft_core.errors import ConfigError
from speft_core.train import TrainCallbacks, train_sparse
from tests.core.test_train import PAD, VOCAB, synthetic_features


def test_checkpoint_schedules_end_at_the_last_step():
    assert checkpoint_steps(12, 4, n_checkpoints=None, every_steps=None) == [4, 8, 12]
    assert checkpoint_steps(12, 4, n_checkpoints=5, every_steps=None) == [3, 5, 8, 10, 12]
    assert checkpoint_steps(10, 4, n_checkpoints=None, every_steps=3) == [3, 6, 9, 10]
    assert checkpoint_steps(3, 3, n_checkpoints=50, every_steps=None) == [1, 2, 3]
    with pytest.raises(ConfigError) as err:
        TrainConfig(n_checkpoints=2, checkpoint_every_steps=5)
    assert err.value.param == "checkpoint_every_steps"


def dropout_bert(seed: int = 0):
    """A 2-layer BERT classifier with dropout, so training draws from the RNG every step."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                        num_labels=2, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.1,
                        pad_token_id=PAD)
    return BertForSequenceClassification(config)


def run(callbacks=None, resume=None, eval_features=None, speft=None, **hyper):
    settings = {"n_epochs": 3, "batch_size": 8, "learning_rate": 1e-2, "seed": 5, **hyper}
    return train_sparse(
        dropout_bert(), task="classification",
        speft=speft or SpeftConfig(metric="gradient", density=0.05),
        hyper=TrainConfig(**settings), train_features=synthetic_features(30),
        eval_features=eval_features, pad_token_id=PAD, base_model="tiny", labels=["0", "1"],
        callbacks=callbacks, device=torch.device("cpu"), resume=resume)


def assert_same_delta(a, b) -> None:
    assert a.modules.keys() == b.modules.keys() and a.extras.keys() == b.extras.keys()
    for name, (indices, values) in a.modules.items():
        assert torch.equal(indices, b.modules[name][0]), name
        assert torch.equal(values, b.modules[name][1]), name  # bit for bit
    for name, tensor in a.extras.items():
        assert torch.equal(tensor, b.extras[name]), name


@pytest.mark.parametrize("mask", ["static", "dynamic"])
def test_a_run_resumed_from_a_mid_epoch_state_ends_bit_for_bit_as_the_uninterrupted_one(mask):
    speft = SpeftConfig(metric="gradient", density=0.05, mask=mask,
                        update_interval=5 if mask == "dynamic" else 0)
    saved: dict[int, bytes] = {}

    def keep(report):
        saved[report.step] = state_to_bytes(report.state())

    whole = run(TrainCallbacks(on_checkpoint=keep), speft=speft, checkpoint_every_steps=3,
                select="last")
    assert sorted(saved) == [3, 6, 9, 12]  # 4 steps an epoch: step 6 is mid-epoch 2
    events: list[str] = []
    resumed = run(TrainCallbacks(on_event=lambda message, data: events.append(message)),
                  resume=state_from_bytes(saved[6]), speft=speft, checkpoint_every_steps=3,
                  select="last")
    assert "resumed from step 6" in events and "mask selected" not in events  # no re-scoring
    assert resumed.steps == whole.steps == 12
    assert_same_delta(resumed.delta, whole.delta)
    if mask == "dynamic":
        assert resumed.mask_updates == whole.mask_updates == 2


def test_a_state_for_other_targets_is_refused_naming_them():
    saved = {}
    run(TrainCallbacks(on_checkpoint=lambda r: saved.setdefault(r.step, r.state())),
        n_epochs=1)
    state = saved[4]
    state.masks = {"elsewhere": torch.zeros(1, dtype=torch.int32)}
    with pytest.raises(ConfigError) as err:
        run(resume=state)
    assert err.value.param == "target_modules"


def test_state_bytes_are_checked_not_executed():
    with pytest.raises(ValueError):
        state_from_bytes(b"not a state")
    with pytest.raises(ValueError, match="format"):
        import io

        buffer = io.BytesIO()
        torch.save({"format": "something else"}, buffer)
        state_from_bytes(buffer.getvalue())


def scripted_validation(monkeypatch, losses: list[float]) -> None:
    """The validation loss at each evaluation: the base model's, then each checkpoint's."""
    script = iter(losses)
    monkeypatch.setattr(train_module._Trainer, "_eval",
                        lambda self, *_: {"eval_loss": next(script), "eval_accuracy": 0.5})


def test_the_best_checkpoint_is_returned_and_early_stopping_ends_the_run(monkeypatch):
    scripted_validation(monkeypatch, [2.0, 1.0, 0.5, 0.7, 0.6, 0.9, 0.1])
    reports, deltas, events = [], {}, []

    def keep(report):
        reports.append(report)
        deltas[report.step] = report.delta()

    result = run(TrainCallbacks(on_checkpoint=keep, on_event=lambda m, d: events.append((m, d))),
                 eval_features=synthetic_features(8, seed=1), checkpoint_every_steps=2,
                 early_stopping={"patience": 3, "min_delta": 0.0})
    # checkpoints at steps 2, 4, 6, 8, 10: best at 4 (0.5), then 3 without improvement
    assert [r.step for r in reports] == [2, 4, 6, 8, 10]
    assert [r.is_best for r in reports] == [True, True, False, False, False]
    assert result.stopped_early and result.steps == 10 and result.best_step == 4
    assert_same_delta(result.delta, deltas[4])
    stop = dict(events)["early stopping"]
    assert stop["step"] == 10 and stop["best_step"] == 4 and "3 checkpoints" in stop["reason"]
    assert reports[1].metrics == {"train_loss": pytest.approx(reports[1].metrics["train_loss"]),
                                  "valid_loss": 0.5, "valid_accuracy": 0.5}


def test_min_delta_decides_what_counts_as_better_and_last_keeps_the_last(monkeypatch):
    scripted_validation(monkeypatch, [2.0, 1.0, 0.95, 0.9, 0.85, 0.8, 0.75])
    steps = []
    result = run(TrainCallbacks(on_checkpoint=lambda r: steps.append((r.step, r.is_best))),
                 eval_features=synthetic_features(8, seed=1), checkpoint_every_steps=2,
                 early_stopping={"patience": 2, "min_delta": 0.1})
    # 0.95 and 0.9 do not beat 1.0 by more than 0.1: stopped after two stale checkpoints
    assert steps == [(2, True), (4, False), (6, False)]
    assert result.stopped_early and result.best_step == 2
    scripted_validation(monkeypatch, [2.0, 1.0, 0.5, 0.7])
    last = run(eval_features=synthetic_features(8, seed=1), n_checkpoints=3, n_epochs=1,
               select="last")
    assert last.best_step is None and not last.stopped_early and last.steps == 4
