"""The training loop: real models learn, the delta is exactly what was trained, hooks are kept."""
from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from speft_core import data as datasets
from speft_core.config import JobSpec, SpeftConfig, TrainConfig
from speft_core.data import IGNORE_INDEX
from speft_core.delta import apply_delta, load_delta, revert_delta, save_delta
from speft_core.errors import ConfigError, TrainingCancelled, UnknownMetricError
from speft_core.masks import choose_mask, per_layer_counts
from speft_core.models import bundled_minilm_path, load_model, load_tokenizer, resolve_model
from speft_core.salience import METRICS, SalienceInputs, compute_salience
from speft_core.sparse_linear import sparse_delta_layers
from speft_core.targets import find_target_linears
from speft_core.tasks import batch_loss, evaluate, example_losses
from speft_core.train import StepReport, TrainCallbacks, fine_tune, train_sparse

CPU = torch.device("cpu")
VOCAB = 100
PAD = 0


# --- helpers --------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[str]) -> str:
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def head_lines(path: Path, count: int, skip: int = 0) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for _, line in zip(range(skip + count), handle)][skip:]


def tiny_bert(seed: int = 0):
    """A 2-layer BERT classifier (hidden 16) built from a config, without dropout."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD,
    )
    return BertForSequenceClassification(config).eval()


def synthetic_features(count: int, seed: int = 0) -> list[dict]:
    """Variable-length token sequences labelled by the parity of their first token."""
    generator = torch.Generator().manual_seed(seed)
    features = []
    for _ in range(count):
        length = int(torch.randint(4, 12, (1,), generator=generator))
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids[0] % 2})
    return features


def train_tiny(model=None, *, features=None, callbacks=None, **overrides):
    """train_sparse on the tiny BERT; `overrides` go to SpeftConfig or TrainConfig by name."""
    speft_fields = set(SpeftConfig.__dataclass_fields__)
    speft = {"metric": "magnitude", "density": 0.05, "head_warmup_steps": 0,
             "score_normalization": "none", "spread_cap": 0}  # the mechanics, no levers
    hyper = {"n_epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "seed": 3}
    for key, value in overrides.items():
        (speft if key in speft_fields else hyper)[key] = value
    model = model if model is not None else tiny_bert()
    return train_sparse(
        model, task="classification", speft=SpeftConfig(**speft), hyper=TrainConfig(**hyper),
        train_features=features if features is not None else synthetic_features(32),
        pad_token_id=PAD, base_model="tiny-bert", labels=["0", "1"],
        callbacks=callbacks, device=CPU,
    )


def target_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in find_target_linears(model).items()}


def initial_mask(model, speft: SpeftConfig) -> dict[str, torch.Tensor]:
    """The mask choose_mask picks for classification from `speft.metric` scores of the
    untouched model."""
    scores = compute_salience(speft.metric, SalienceInputs(
        model=model, targets=find_target_linears(model), batches=[],
        loss_fn=lambda m, b: example_losses(m, b, "classification"),
    ))
    return choose_mask(scores, speft, seed=0, task="classification")


def assert_same_state(before: dict[str, torch.Tensor], model) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == []


# --- real models ----------------------------------------------------------------------------


@pytest.mark.slow
def test_training_real_minilm_on_sst2_beats_untrained_head(data_dir: Path, tmp_path: Path):
    # 512 short rows (64 steps) learn reliably across seeds; 256 longer rows (32 steps) did not
    train_rows = head_lines(data_dir / "sst2/train.jsonl", 512)
    train_file = write_jsonl(tmp_path / "train.jsonl", train_rows)
    dev_file = write_jsonl(tmp_path / "dev.jsonl", head_lines(data_dir / "sst2/dev.jsonl", 200))
    spec = JobSpec.from_dict({
        "model": "minilm-l6", "training_file": train_file, "validation_file": dev_file,
        "task": "classification",
        "method": {"type": "speft", "speft": {"metric": "gradient", "density": 0.01,
                                              "scoring_examples": 64}},
        "hyperparameters": {"n_epochs": 2, "batch_size": 16, "learning_rate": 2e-3,
                            "max_length": 32, "seed": 0},
    })
    result = fine_tune(spec, device=CPU)

    assert result.eval["eval_accuracy"] > result.base_eval["eval_accuracy"] + 0.1
    assert result.eval["eval_accuracy"] > 0.7
    delta = result.delta
    assert delta.metadata["task"] == "classification"
    assert json.loads(delta.metadata["labels"]) == ["negative", "positive"]
    assert set(delta.extras) == {"classifier.weight", "classifier.bias"}
    assert result.trainable_params == delta.nnz + sum(t.numel() for t in delta.extras.values())

    # A fresh base plus the saved delta evaluates exactly as the trainer's final model did.
    save_delta(delta, tmp_path / "delta.safetensors")
    loaded = load_delta(tmp_path / "delta.safetensors")
    source = resolve_model("minilm-l6")
    tokenizer = load_tokenizer(source.path)
    model = load_model(source.path, "classification", labels=loaded.labels).eval()
    targeted = sum(m.weight.numel() for m in find_target_linears(model).values())
    assert loaded.nnz == round(0.01 * targeted)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = datasets.read_jsonl(dev_file, "classification")
    features = datasets.tokenize(examples, tokenizer, "classification", max_length=32,
                                 label2id={label: i for i, label in enumerate(loaded.labels)})

    def evaluated() -> dict[str, float]:
        batches = datasets.batches(features, 16, pad_token_id=tokenizer.pad_token_id,
                                   shuffle=False, seed=0)
        return evaluate(model, batches, "classification")

    apply_delta(model, loaded)
    applied = evaluated()
    assert applied["eval_accuracy"] == result.eval["eval_accuracy"]
    assert applied["eval_loss"] == pytest.approx(result.eval["eval_loss"], abs=1e-5)

    revert_delta(model)
    assert_same_state(before, model)


def test_causal_lm_on_stories_trains_the_completion_only(data_dir: Path, stories_dir: Path,
                                                         tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SPEFT_MODELS_DIR", str(stories_dir.parent))
    tokenizer = load_tokenizer(stories_dir)

    def prompt_tokens(line: str) -> int:
        return len(tokenizer(json.loads(line)["prompt"], add_special_tokens=False)["input_ids"])

    # rows whose prompt fits well within max_length, so no prompt is cut (checked by hand below)
    rows = [line for line in head_lines(data_dir / "alpaca200/train.jsonl", 200)
            if prompt_tokens(line) < 60]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows[:64])
    dev_file = write_jsonl(tmp_path / "dev.jsonl", rows[64:96])
    spec = JobSpec.from_dict({
        "model": "stories-260k", "training_file": train_file, "validation_file": dev_file,
        "task": "causal_lm",
        "method": {"speft": {"metric": "gradient", "density": 0.05}},
        "hyperparameters": {"n_epochs": 8, "batch_size": 64, "learning_rate": 1e-2,
                            "max_length": 96, "warmup_ratio": 0.0},
    })
    steps: list[StepReport] = []
    result = fine_tune(spec, callbacks=TrainCallbacks(on_step=steps.append), device=CPU)

    # The loss goes down, in training and on held-out rows.
    assert len(steps) == 8
    assert steps[-1].train_loss < steps[0].train_loss - 0.1
    assert result.eval["eval_loss"] < result.base_eval["eval_loss"]
    assert "eval_perplexity" in result.eval
    delta = result.delta
    assert delta.extras == {}
    assert delta.metadata["task"] == "causal_lm"
    assert delta.metadata["base_model"] == "stories-260k"
    assert delta.labels == []

    # The first step's loss (one batch holding every row, no update yet) is the mean
    # next-token loss over completion tokens only: computed here by hand from the logits.
    model = load_model(resolve_model("stories-260k").path, "causal_lm").eval()
    examples = datasets.read_jsonl(train_file, "causal_lm")
    features = datasets.tokenize(examples, tokenizer, "causal_lm", max_length=96)
    batch = datasets.collate(features, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    completion_losses, everything = [], []
    for row, (example, feature) in enumerate(zip(examples, features)):
        prompt_len = 1 + len(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
        ids = feature["input_ids"]
        assert feature["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert feature["labels"][prompt_len:] == ids[prompt_len:]
        for position in range(len(ids) - 1):
            loss = F.cross_entropy(logits[row, position], torch.tensor(ids[position + 1]))
            everything.append(loss)
            if position + 1 >= prompt_len:
                completion_losses.append(loss)
    reference = torch.stack(completion_losses).mean()
    assert steps[0].train_loss == pytest.approx(float(reference), abs=1e-4)
    assert float(torch.stack(everything).mean()) != pytest.approx(float(reference), abs=1e-2)
    with torch.no_grad():
        assert float(batch_loss(model, batch, "causal_lm")) == pytest.approx(float(reference),
                                                                              abs=1e-5)
        # A prompt position given a real label would count: -100 is what keeps it out.
        relabelled = dict(batch, labels=batch["labels"].clone())
        relabelled["labels"][0, 1] = batch["input_ids"][0, 1]
        assert float(batch_loss(model, relabelled, "causal_lm")) != pytest.approx(
            float(reference), abs=1e-7)


def test_default_mask_on_a_decoder_is_dynamic_with_the_auto_interval(data_dir: Path,
                                                                     stories_dir: Path,
                                                                     tmp_path: Path,
                                                                     monkeypatch):
    """mask 'auto' re-selects a causal LM's mask about 12 times a job, at least 8 steps apart:
    32 steps give updates at steps 8, 16 and 24 (none at the last step)."""
    monkeypatch.setenv("SPEFT_MODELS_DIR", str(stories_dir.parent))
    train_file = write_jsonl(tmp_path / "train.jsonl",
                             head_lines(data_dir / "alpaca200/train.jsonl", 64))
    spec = JobSpec.from_dict({
        "model": "stories-260k", "training_file": train_file, "task": "causal_lm",
        "method": {"speft": {"metric": "gradient", "density": 0.02, "scoring_examples": 16}},
        "hyperparameters": {"n_epochs": 2, "batch_size": 4, "max_length": 48},
    })
    events: list[tuple[str, dict]] = []
    result = fine_tune(spec, callbacks=TrainCallbacks(on_event=lambda m, d: events.append((m, d))),
                       device=CPU)
    selected = next(data for message, data in events if message == "mask selected")
    assert selected["mask"] == "dynamic" and selected["update_interval"] == 8
    assert [data["step"] for message, data in events if message == "mask updated"] == [8, 16, 24]
    assert result.steps == 32 and result.mask_updates == 3
    assert result.delta.metadata["mask"] == "dynamic"


# --- the loop on a tiny BERT ----------------------------------------------------------------


def test_dynamic_mask_moves_and_static_mask_stays():
    speft = SpeftConfig(metric="magnitude", density=0.05, score_normalization="none",
                        spread_cap=0)
    expected = initial_mask(tiny_bert(), speft)

    static = train_tiny(metric="magnitude", density=0.05)
    assert static.mask_updates == 0 and static.delta.metadata["mask"] == "static"  # auto
    assert static.delta.modules.keys() == expected.keys()
    for name, (indices, _) in static.delta.modules.items():
        assert torch.equal(indices, expected[name])

    events: list[tuple[str, dict]] = []
    model = tiny_bert()
    before = target_weights(model)
    dynamic = train_tiny(model, metric="magnitude", density=0.05, mask="dynamic",
                         update_interval=2, update_fraction=0.25,
                         callbacks=TrainCallbacks(on_event=lambda m, d: events.append((m, d))))
    updates = [data for message, data in events if message == "mask updated"]
    # 8 steps, re-selected after steps 2, 4 and 6 (never after the last one)
    assert [data["step"] for data in updates] == [2, 4, 6]
    assert all(data["grown"] > 0 for data in updates)
    assert dynamic.mask_updates == 3
    assert dynamic.delta.nnz == static.delta.nnz
    moved = [name for name, (indices, _) in dynamic.delta.modules.items()
             if not torch.equal(indices, expected[name])]
    assert moved
    for name, (indices, values) in dynamic.delta.modules.items():
        assert indices.numel() == values.numel()
        assert bool((indices[1:] > indices[:-1]).all())
    after = target_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert sparse_delta_layers(model) == {}


def test_dynamic_global_mask_can_move_entries_into_a_module_holding_one():
    """Module counts change under a global dynamic mask, also from a single entry."""
    model = tiny_bert()
    query = model.bert.encoder.layer[0].attention.self.query.weight
    key = model.bert.encoder.layer[0].attention.self.key.weight
    with torch.no_grad():
        query.fill_(1e-4)
        query.view(-1)[:19] = 1.0  # 19 of the 20 largest
        key.fill_(1e-4)
        key.view(-1)[100] = 2.0  # the largest: key starts with exactly one entry
        key.view(-1)[[3, 50, 60, 70, 200]] = 0.5  # the largest outside the first mask
    result = train_tiny(model, metric="magnitude", density=20, mask="dynamic",
                        update_interval=2, update_fraction=1.0, n_epochs=1,
                        target_modules=["layer.0.attention.self.query",
                                        "layer.0.attention.self.key"])
    # 4 steps, one update after step 2: every entry is regrown outside the old mask
    assert result.mask_updates == 1
    key_indices, key_values = result.delta.modules["bert.encoder.layer.0.attention.self.key"]
    assert key_indices.tolist() == [3, 50, 60, 70, 200]
    assert key_values.numel() == 5
    assert result.delta.nnz == 20


def test_cancel_stops_training_and_restores_the_base():
    model = tiny_bert()
    before = target_weights(model)
    reports: list[StepReport] = []

    with pytest.raises(TrainingCancelled):
        train_tiny(model, callbacks=TrainCallbacks(
            on_step=reports.append, should_cancel=lambda: len(reports) >= 2))

    assert [r.step for r in reports] == [1, 2]
    after = target_weights(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert sparse_delta_layers(model) == {}


def test_step_reports_count_steps_and_follow_warmup_then_decay():
    reports: list[StepReport] = []
    evals: list[tuple[int, dict]] = []
    features = synthetic_features(30)
    # ceil(30 / 4) = 8 batches an epoch, in groups of 3 -> 3 optimizer steps an epoch
    result = train_tiny(
        features=features, batch_size=4, gradient_accumulation_steps=3, n_epochs=2,
        learning_rate=1e-2, warmup_ratio=0.34,
        callbacks=TrainCallbacks(on_step=reports.append, on_eval=lambda s, m: evals.append((s, m))),
    )
    total = math.ceil(math.ceil(30 / 4) / 3) * 2
    assert result.steps == total == 6
    assert [r.step for r in reports] == list(range(1, total + 1))
    assert {r.total_steps for r in reports} == {total}
    assert [r.epoch for r in reports] == [0, 0, 0, 1, 1, 1]
    lrs = [r.lr for r in reports]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1e-2)
    assert 0 < peak < total - 1  # warmup (2 steps here) reaches the peak, then it decays
    assert all(a < b for a, b in pairwise(lrs[:peak + 1]))
    assert all(a >= b for a, b in pairwise(lrs[peak:]))
    assert 0 < lrs[-1] < max(lrs)
    assert all(math.isfinite(r.grad_norm) and r.grad_norm > 0 for r in reports)
    assert all(math.isfinite(r.train_loss) for r in reports)
    assert evals == []  # no eval features: no eval callback


def test_gradient_accumulation_matches_a_larger_batch():
    features = synthetic_features(32)
    runs = {}
    for batch_size, accumulation in ((4, 2), (8, 1)):
        reports: list[StepReport] = []
        result = train_tiny(features=features, batch_size=batch_size,
                            gradient_accumulation_steps=accumulation,
                            callbacks=TrainCallbacks(on_step=reports.append))
        runs[batch_size] = (result, reports)
    (small, small_reports), (large, large_reports) = runs[4], runs[8]
    assert small.steps == large.steps == 8
    assert len(small_reports) == len(large_reports) == 8
    assert small_reports[0].train_loss == pytest.approx(large_reports[0].train_loss, abs=1e-5)
    # the accumulated gradient is the mean over both halves, not their sum
    assert small_reports[0].grad_norm == pytest.approx(large_reports[0].grad_norm, rel=1e-4)


def test_per_layer_scope_gives_each_module_its_share_of_an_absolute_count():
    model = tiny_bert()
    sizes = {n: m.weight.numel() for n, m in find_target_linears(model).items()}
    result = train_tiny(model, metric="gradient", density=500, scope="layer", n_epochs=1)
    delta = result.delta
    assert delta.nnz == 500
    assert delta.metadata["nnz"] == "500"
    assert delta.metadata["density"] == "500"
    assert delta.metadata["scope"] == "layer"
    expected = per_layer_counts(sizes, 500)
    assert {n: int(i.numel()) for n, (i, _) in delta.modules.items()} == expected
    assert len(set(expected.values())) > 1  # modules differ in size, so do their shares


def test_same_seed_gives_the_same_delta(tmp_path: Path):
    """Through fine_tune on a tiny model folder: the new head is drawn from the seed too."""
    from transformers import BertConfig, BertModel

    tokenizer = load_tokenizer(bundled_minilm_path())
    folder = tmp_path / "tiny-bert"
    BertModel(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
    )).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rows = [json.dumps({"text": f"{word} film number {i}", "label": label})
            for i, (word, label) in enumerate([("great", "positive"), ("awful", "negative")] * 12)]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)

    def run(seed: int):
        return fine_tune(JobSpec.from_dict({
            "model": str(folder), "training_file": train_file,
            "method": {"speft": {"metric": "gradient", "density": 0.05, "mask": "dynamic",
                                 "update_interval": 2}},
            "hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate": 1e-2,
                                "max_length": 32, "seed": seed},  # the model has 64 positions
        }), device=CPU).delta

    first, second, other = run(7), run(7), run(8)
    assert first.modules.keys() == second.modules.keys()
    for name, (indices, values) in first.modules.items():
        assert torch.equal(indices, second.modules[name][0])
        assert torch.equal(values, second.modules[name][1])
    assert first.extras.keys() == second.extras.keys() == {"classifier.weight", "classifier.bias"}
    for name, tensor in first.extras.items():
        assert torch.equal(tensor, second.extras[name])
    assert first.metadata == second.metadata
    assert not torch.equal(first.extras["classifier.weight"], other.extras["classifier.weight"])


# --- the spec --------------------------------------------------------------------------------


def job_body(**speft) -> dict:
    return {"model": "minilm-l6", "training_file": "train.jsonl",
            "method": {"type": "speft", "speft": speft}}


def test_unknown_metric_names_the_field_and_lists_valid_metrics():
    with pytest.raises(UnknownMetricError) as info:
        JobSpec.from_dict(job_body(metric="salami"))
    assert info.value.param == "method.speft.metric"
    assert "salami" in str(info.value)
    for name in METRICS:
        assert name in str(info.value)


@pytest.mark.parametrize("density", [0, 1.5, -1])
def test_density_out_of_range_is_a_config_error_on_the_density_field(density):
    with pytest.raises(ConfigError) as info:
        JobSpec.from_dict(job_body(density=density))
    assert info.value.param == "method.speft.density"


def test_unknown_hyperparameter_is_a_config_error_naming_it():
    body = dict(job_body(), hyperparameters={"n_epochs": 1, "learnin_rate": 1e-3})
    with pytest.raises(ConfigError) as info:
        JobSpec.from_dict(body)
    assert info.value.param == "hyperparameters.learnin_rate"
    assert "learnin_rate" in str(info.value)


def test_head_warm_up_trains_the_head_alone_before_scoring():
    events: list[tuple[str, dict]] = []
    callbacks = TrainCallbacks(on_event=lambda message, data: events.append((message, data)))
    model = tiny_bert()
    encoder = {n: p.detach().clone() for n, p in model.named_parameters()
               if not n.startswith("classifier")}
    warmed = train_tiny(model, metric="gradient", head_warmup_steps=4, n_epochs=1,
                        callbacks=callbacks)
    cold = train_tiny(metric="gradient", n_epochs=1, head_warmup_steps=0)
    assert [m for m, _ in events].index("head warmed up") < [m for m, _ in events].index(
        "mask selected")
    assert dict(events)["head warmed up"]["steps"] == 4
    # the warmed head's gradients pick other entries than the random head's
    assert any(not torch.equal(warmed.delta.modules[n][0], cold.delta.modules[n][0])
               for n in cold.delta.modules)
    assert all(torch.equal(p, encoder[n])  # training leaves the base as it found it
               for n, p in model.named_parameters() if n in encoder)


def test_scoring_holdout_scores_on_examples_the_head_warm_up_never_saw():
    """scoring_holdout 0.25: salience is scored on a quarter of the training examples, the head
    warm-up uses the other three quarters, and training then sees all of them."""
    features = synthetic_features(32)
    for index, feature in enumerate(features):  # a first token that names the example
        feature["input_ids"][0] = index + 1
    phase, seen = ["warm-up"], {"warm-up": set(), "scoring": set(), "training": set()}
    advance = {"head warmed up": "scoring", "mask selected": "training"}

    def on_event(message: str, _data: dict) -> None:
        if message in advance:
            phase[0] = advance[message]

    callbacks = TrainCallbacks(on_event=on_event)
    model = tiny_bert()
    model.bert.embeddings.register_forward_pre_hook(
        lambda _m, args, kwargs: seen[phase[0]].update(
            int(i) - 1 for i in kwargs.get("input_ids", args[0] if args else None)[:, 0]
            if int(i) != PAD), with_kwargs=True)
    train_tiny(model, features=features, callbacks=callbacks, metric="gradient",
               head_warmup_steps=3, scoring_holdout=0.25, scoring_examples=1024, n_epochs=1)
    assert len(seen["scoring"]) == 8
    assert seen["warm-up"] and not seen["warm-up"] & seen["scoring"]
    assert seen["warm-up"] | seen["scoring"] <= set(range(32))
    assert seen["training"] == set(range(32))


def test_spread_cap_bounds_every_row_and_column_of_the_trained_delta():
    """gradient salience on the tiny BERT with spread_cap 1.5: no row or column of any module
    holds more than ceil(1.5 x density x its length) entries, and the budget is kept."""
    model = tiny_bert()
    capped = train_tiny(model, metric="gradient", n_epochs=1, spread_cap=1.5)
    plain = train_tiny(metric="gradient", n_epochs=1)
    targets = find_target_linears(model)
    assert capped.delta.nnz == plain.delta.nnz
    fraction = capped.delta.nnz / sum(t.weight.numel() for t in targets.values())
    overfull_plain = 0
    for name, target in targets.items():
        rows, cols = target.weight.shape
        row_cap, col_cap = math.ceil(1.5 * fraction * cols), math.ceil(1.5 * fraction * rows)
        for delta, is_capped in ((capped.delta, True), (plain.delta, False)):
            flat = delta.modules[name][0].long()
            per_row = int(torch.bincount(flat // cols, minlength=rows).max())
            per_col = int(torch.bincount(flat % cols, minlength=cols).max())
            if is_capped:
                assert per_row <= row_cap and per_col <= col_cap, name
            else:
                overfull_plain += per_row > row_cap or per_col > col_cap
    assert overfull_plain > 0  # without the cap some line does take more than its share


@pytest.mark.parametrize("value", [-0.1, 0.6, "half"])
def test_scoring_holdout_out_of_range_names_the_field(value):
    with pytest.raises(ConfigError, match="scoring_holdout") as caught:
        SpeftConfig(scoring_holdout=value)
    assert caught.value.param == "scoring_holdout"
