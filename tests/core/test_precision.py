"""Base weights in bf16 with float32 trained values; gradient checkpointing with the patched weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from speft_core.config import JobSpec, SpeftConfig, TrainConfig
from speft_core.errors import ConfigError
from speft_core.models import bundled_minilm_path, load_model, load_tokenizer
from speft_core.sparse_linear import inject_sparse_deltas, sparse_delta_layers
from speft_core.targets import find_target_linears
from speft_core.tasks import batch_loss
from speft_core.train import (
    StepReport,
    TrainCallbacks,
    _Trainer,
    fine_tune,
    gradient_checkpointing,
)

CPU = torch.device("cpu")
# bf16 keeps 8 bits of mantissa, so the bf16 forward differs from the fp32 one a little and the
# two runs may pick slightly different masks. The curves must agree to 2% of the loss at every
# step (observed: at most 0.6% over 18 steps); the loss falls by ~25% over the run.
LOSS_TOLERANCE = 0.02


def write_rows(data_dir: Path, path: Path, count: int) -> str:
    with open(data_dir / "alpaca200/train.jsonl", encoding="utf-8") as handle:
        rows = [line for _, line in zip(range(count), handle)]
    path.write_text("".join(rows), encoding="utf-8")
    return str(path)


@pytest.fixture()
def bf16_stories(stories_dir: Path, tmp_path: Path) -> Path:
    """A bf16 copy of stories-260k (safetensors) with its tokenizer."""
    model = load_model(stories_dir, "causal_lm", dtype="float32").to(torch.bfloat16)
    folder = tmp_path / "stories-bf16"
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(stories_dir).save_pretrained(folder)
    for extra in stories_dir.glob("tokenizer*"):
        if not (folder / extra.name).exists():
            shutil.copy(extra, folder / extra.name)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return folder


class Observed:
    """Records each run's optimizer and the dtype of the base weights it trains against."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []
        self.base_dtypes: list[set[torch.dtype]] = []
        original = _Trainer._optimizer

        def spy(trainer, layers):
            optimizer = original(trainer, layers)
            self.optimizers.append(optimizer)
            self.base_dtypes.append({layer.base.weight.dtype for layer in layers.values()})
            return optimizer

        monkeypatch.setattr(_Trainer, "_optimizer", spy)


def run_job(model: str, train_file: str, **hyper) -> tuple[list[float], object]:
    spec = JobSpec.from_dict({
        "model": model, "training_file": train_file, "task": "causal_lm",
        "method": {"speft": {"metric": "gradient", "density": 0.05}},
        "hyperparameters": {"n_epochs": 6, "batch_size": 16, "learning_rate": 1e-2,
                            "max_length": 64, "warmup_ratio": 0.0, **hyper},
    })
    steps: list[StepReport] = []
    result = fine_tune(spec, callbacks=TrainCallbacks(on_step=steps.append), device=CPU)
    return [s.train_loss for s in steps], result


def test_bf16_base_trains_float32_values_and_follows_the_fp32_loss_curve(
    data_dir: Path, stories_dir: Path, bf16_stories: Path, tmp_path: Path, monkeypatch
):
    train_file = write_rows(data_dir, tmp_path / "train.jsonl", 32)
    observed = Observed(monkeypatch)
    fp32_losses, fp32 = run_job(str(stories_dir), train_file, n_epochs=4)
    bf16_losses, bf16 = run_job(str(bf16_stories), train_file, n_epochs=4)  # auto: the checkpoint's
    assert observed.base_dtypes == [{torch.float32}, {torch.bfloat16}]
    optimizer = observed.optimizers[1]
    for param in optimizer.param_groups[0]["params"]:
        assert param.dtype == torch.float32
        state = optimizer.state[param]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    for _, values in bf16.delta.modules.values():
        assert values.dtype == torch.float32
    assert bf16.delta.metadata["base_dtype"] == "bfloat16"
    assert fp32.delta.metadata["base_dtype"] == "float32"
    assert fp32_losses[-1] < 0.85 * fp32_losses[0]  # it learns, far beyond the tolerance
    for step, (a, b) in enumerate(zip(fp32_losses, bf16_losses)):
        assert abs(a - b) <= LOSS_TOLERANCE * a, (step, fp32_losses, bf16_losses)


def test_dtype_option_overrides_the_checkpoint_dtype(
    data_dir: Path, bf16_stories: Path, tmp_path: Path, monkeypatch
):
    train_file = write_rows(data_dir, tmp_path / "train.jsonl", 16)
    observed = Observed(monkeypatch)
    run_job(str(bf16_stories), train_file, n_epochs=1, dtype="float32")
    run_job(str(bf16_stories), train_file, n_epochs=1, dtype="float16")
    assert observed.base_dtypes == [{torch.float32}, {torch.float16}]


def test_dtype_and_gradient_checkpointing_are_checked_and_named():
    with pytest.raises(ConfigError) as err:
        JobSpec.from_dict({"model": "m", "training_file": "f",
                           "hyperparameters": {"dtype": "float8"}})
    assert err.value.param == "hyperparameters.dtype"
    with pytest.raises(ConfigError) as err:
        TrainConfig(gradient_checkpointing="yes")  # type: ignore[arg-type]
    assert err.value.param == "gradient_checkpointing"
    with pytest.raises(ConfigError) as err:
        SpeftConfig(scoring_batch_size=0)
    assert err.value.param == "scoring_batch_size"


# --- gradient checkpointing -----------------------------------------------------------------


def value_gradients(model: nn.Module, batch: dict, task: str, *, checkpointing: bool):
    """Gradients of the sparse values for one batch, and how often the patched layers ran."""
    layers = sparse_delta_layers(model)
    calls = [0]
    handles = [layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for layer in layers.values()]
    for layer in layers.values():
        layer.values.grad = None
    with gradient_checkpointing(model, checkpointing):
        model.train()
        torch.manual_seed(0)  # the same dropout masks in both runs (checkpointing replays the RNG)
        batch_loss(model, batch, task).backward()
        model.eval()
    for handle in handles:
        handle.remove()
    return {n: layer.values.grad.clone() for n, layer in layers.items()}, calls[0]


def patched(model: nn.Module) -> nn.Module:
    """Random 5% masks with non-zero values on every target, so W' differs from W."""
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(3)
    masks, values = {}, {}
    for name, linear in find_target_linears(model, None).items():
        count = max(1, linear.weight.numel() // 20)
        masks[name] = torch.randperm(linear.weight.numel(), generator=generator)[:count].sort().values
        values[name] = torch.randn(count, generator=generator) * 0.05
    inject_sparse_deltas(model, masks, values)
    return model


@pytest.mark.parametrize("which", ["stories", "minilm"])
def test_checkpointing_gives_the_same_value_gradients(which: str, stories_dir: Path):
    generator = torch.Generator().manual_seed(5)
    if which == "stories":
        model, task = load_model(stories_dir, "causal_lm"), "causal_lm"
        ids = torch.randint(3, 512, (4, 24), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    else:
        model = load_model(bundled_minilm_path(), "classification", labels=["a", "b"])
        task = "classification"
        ids = torch.randint(1000, 5000, (4, 24), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "labels": torch.tensor([0, 1, 1, 0])}
    model = patched(model)
    plain, plain_calls = value_gradients(model, batch, task, checkpointing=False)
    checkpointed, checkpointed_calls = value_gradients(model, batch, task, checkpointing=True)
    # the patched layers really ran again in the backward (torch stops a recomputation once
    # it has every saved tensor it needs, so not always all of them)
    assert checkpointed_calls >= 1.5 * plain_calls
    assert not model.is_gradient_checkpointing
    assert plain and set(plain) == set(checkpointed)
    assert any(float(g.abs().max()) > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_training_with_checkpointing_gives_the_same_delta(
    data_dir: Path, stories_dir: Path, tmp_path: Path
):
    train_file = write_rows(data_dir, tmp_path / "train.jsonl", 32)
    plain_losses, plain = run_job(str(stories_dir), train_file, n_epochs=2)
    ckpt_losses, ckpt = run_job(str(stories_dir), train_file, n_epochs=2,
                                gradient_checkpointing=True)
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5)
    for name, (indices, values) in plain.delta.modules.items():
        assert torch.equal(ckpt.delta.modules[name][0], indices)
        torch.testing.assert_close(ckpt.delta.modules[name][1], values, rtol=1e-4, atol=1e-6)
