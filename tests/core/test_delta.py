"""The delta file: round trip, exact apply/revert/merge, fingerprint, corrupt-file refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from speft_core.delta import (
    FORMAT,
    REQUIRED_METADATA,
    Delta,
    DeltaStateError,
    applied_delta,
    apply_delta,
    delta_to_bytes,
    fingerprint,
    index_dtype,
    load_delta,
    merge_delta,
    revert_delta,
    save_delta,
    verify_delta,
)
from speft_core.errors import DeltaFormatError, DeltaMismatchError

LABELS = ["negative", "positive"]


@pytest.fixture()
def model() -> nn.Module:
    """A tiny BERT classifier built from a config (random weights, deterministic)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def target_names(model: nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".encoder." in f".{name}"
    ]


def make_delta(model: nn.Module, *, per_module: int = 20, seed: int = 1) -> Delta:
    """A random sparse delta over the encoder Linears, a new classifier head, full metadata."""
    generator = torch.Generator().manual_seed(seed)
    names = target_names(model)
    modules = {}
    for name in names:
        numel = model.get_submodule(name).weight.numel()
        indices = (
            torch.randperm(numel, generator=generator)[:per_module]
            .sort()
            .values.to(index_dtype(numel))
        )
        modules[name] = (indices, torch.randn(per_module, generator=generator) * 0.1)
    extras = {
        "classifier.weight": torch.randn(2, 16, generator=generator),
        "classifier.bias": torch.randn(2, generator=generator),
    }
    metadata = {
        "base_model": "tiny-bert",
        "base_fingerprint": fingerprint(model, names),
        "metric": "gradient",
        "density": "0.01",
        "task": "classification",
        "labels": json.dumps(LABELS),
        "note": "free keys are kept",
    }
    return Delta(modules=modules, extras=extras, metadata=metadata)


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (3, 9), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def dense_reference(model: nn.Module, delta: Delta) -> nn.Module:
    """W + scatter(indices, values) computed densely on a copy, independently of delta.py."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, (indices, values) in delta.modules.items():
            weight = reference.get_submodule(name).weight
            dense = torch.zeros(weight.numel(), dtype=weight.dtype).scatter(
                0, indices.long(), values
            )
            weight.copy_(weight + dense.view_as(weight))
        params = dict(reference.named_parameters())
        for name, value in delta.extras.items():
            params[name].copy_(value)
    return reference


# --- round trip and size --------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(model: nn.Module, tmp_path: Path) -> None:
    delta = make_delta(model)
    path = tmp_path / "delta.safetensors"
    save_delta(delta, path)
    loaded = load_delta(path)
    assert list(loaded.modules) == sorted(delta.modules)
    for name, (indices, values) in delta.modules.items():
        got_indices, got_values = loaded.modules[name]
        assert got_indices.dtype == torch.int32 and torch.equal(got_indices, indices)
        assert got_values.dtype == values.dtype and torch.equal(got_values, values)
    assert set(loaded.extras) == set(delta.extras)
    assert all(torch.equal(loaded.extras[k], v) for k, v in delta.extras.items())
    assert loaded.metadata == {**delta.metadata, "format": FORMAT, "nnz": str(delta.nnz),
                               "values_dtype": "float32"}
    assert loaded.labels == LABELS and loaded.nnz == delta.nnz == 20 * len(delta.modules)
    assert load_delta(path.read_bytes()).metadata == loaded.metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors"]  # no temp file left


def test_equal_deltas_save_to_identical_bytes(model: nn.Module) -> None:
    delta = make_delta(model)
    delta.metadata.update({f"extra_key_{i}": str(i) for i in range(8)})
    saved = {delta_to_bytes(delta) for _ in range(6)}  # the hash map's order changed per save
    assert len(saved) == 1
    header = load_delta(saved.pop()).metadata
    assert list(header) == sorted(header)


def test_file_size_is_about_nnz_times_index_plus_value_bytes(model: nn.Module) -> None:
    delta = make_delta(model, per_module=200)
    extras_bytes = sum(t.numel() * t.element_size() for t in delta.extras.values())
    payload = delta.nnz * (4 + 4) + extras_bytes
    size = len(delta_to_bytes(delta))
    assert payload <= size <= payload + 4096  # header: names, offsets, metadata
    half = Delta(
        {n: (i, v.to(torch.bfloat16)) for n, (i, v) in delta.modules.items()},
        delta.extras,
        delta.metadata,
    )
    assert len(delta_to_bytes(half)) <= delta.nnz * (4 + 2) + extras_bytes + 4096


def test_index_dtype_switches_to_int64_at_2_pow_31() -> None:
    assert index_dtype(1) == torch.int32
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64
    assert index_dtype(10**12) == torch.int64


# --- apply / revert / merge ---------------------------------------------------------------------


def test_apply_matches_a_dense_merge_computed_independently(model: nn.Module) -> None:
    delta = make_delta(model)
    reference = dense_reference(model, delta)
    apply_delta(model, delta)
    with torch.no_grad():
        assert torch.equal(model(**inputs()).logits, reference(**inputs()).logits)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert applied_delta(model) is delta


def test_apply_then_revert_restores_every_tensor_bit_for_bit(model: nn.Module) -> None:
    before = state_copy(model)
    with torch.no_grad():
        logits = model(**inputs()).logits
    apply_delta(model, make_delta(model))
    assert not torch.equal(model.classifier.weight, before["classifier.weight"])
    revert_delta(model)
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    with torch.no_grad():
        assert torch.equal(model(**inputs()).logits, logits)
    assert applied_delta(model) is None


def test_revert_is_exact_in_bfloat16(model: nn.Module) -> None:
    model = model.to(torch.bfloat16)
    before = state_copy(model)
    delta = make_delta(model)
    apply_delta(model, delta)
    revert_delta(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_values_dtype_is_recorded_checked_and_optional(model: nn.Module) -> None:
    delta = make_delta(model)
    assert load_delta(delta_to_bytes(delta)).metadata["values_dtype"] == "float32"
    lying = Delta(delta.modules, delta.extras, {**delta.metadata, "values_dtype": "bfloat16"})
    with pytest.raises(DeltaFormatError, match="values_dtype='bfloat16' but the values are float32"):
        delta_to_bytes(lying)
    tensors = {f"{n}.indices": i for n, (i, _) in delta.modules.items()}
    tensors |= {f"{n}.values": v for n, (_, v) in delta.modules.items()}
    tensors |= {f"extra.{n}": t for n, t in delta.extras.items()}
    old = {**delta.metadata, "format": FORMAT, "nnz": str(delta.nnz)}  # a file from before
    assert "values_dtype" not in load_delta(safetensors_save(tensors, metadata=old)).metadata
    with pytest.raises(DeltaFormatError, match="values_dtype"):
        load_delta(safetensors_save(tensors, metadata={**old, "values_dtype": "float16"}))


def test_float32_values_on_a_bfloat16_base_add_in_float32_and_round_once(
    model: nn.Module,
) -> None:
    model = model.to(torch.bfloat16)
    delta = make_delta(model)  # float32 values, as training writes them
    name, (indices, values) = next(iter(delta.modules.items()))
    weight = model.get_submodule(name).weight
    expected = (weight.detach().view(-1)[indices.long()].float() + values).to(torch.bfloat16)
    merge_delta(model, delta)
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight.detach().view(-1)[indices.long()], expected)


def test_second_apply_merge_and_empty_revert_are_refused(model: nn.Module) -> None:
    delta = make_delta(model)
    with pytest.raises(DeltaStateError):
        revert_delta(model)
    apply_delta(model, delta)
    with pytest.raises(DeltaStateError, match="revert it first"):
        apply_delta(model, delta)
    with pytest.raises(DeltaStateError):
        merge_delta(model, delta)
    revert_delta(model)
    apply_delta(model, delta)  # fine again after revert
    revert_delta(model)


def test_merge_is_permanent_and_equals_dense_reference(model: nn.Module) -> None:
    delta = make_delta(model)
    reference = dense_reference(model, delta)
    merge_delta(model, delta)
    assert applied_delta(model) is None
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(
        DeltaMismatchError
    ):  # the base changed, so the fingerprint no longer matches
        apply_delta(model, delta)


def test_applied_delta_round_trips_through_the_file(model: nn.Module) -> None:
    delta = make_delta(model)
    reference = dense_reference(model, delta)
    apply_delta(model, load_delta(delta_to_bytes(delta)))
    with torch.no_grad():
        assert torch.equal(model(**inputs()).logits, reference(**inputs()).logits)


# --- refusals against a model -------------------------------------------------------------------


def test_fingerprint_mismatch_is_refused_and_leaves_the_model_untouched(model: nn.Module) -> None:
    delta = make_delta(model)
    name = next(iter(delta.modules))
    with torch.no_grad():
        model.get_submodule(name).weight[0, 0] += 1.0
    before = state_copy(model)
    with pytest.raises(DeltaMismatchError, match="fingerprint"):
        apply_delta(model, delta)
    with pytest.raises(DeltaMismatchError):
        verify_delta(model, delta)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert applied_delta(model) is None
    apply_delta(model, delta, verify=False)  # the caller may skip the fingerprint explicitly
    revert_delta(model)


def test_fingerprint_depends_on_names_shapes_dtypes_and_bytes(model: nn.Module) -> None:
    names = target_names(model)
    assert fingerprint(model, names) == fingerprint(model, list(reversed(names)))
    assert fingerprint(model, names) != fingerprint(model, names[:-1])
    assert fingerprint(model, names) != fingerprint(copy.deepcopy(model).double(), names)
    assert len(fingerprint(model, names)) == 64
    with pytest.raises(DeltaMismatchError, match="does not exist"):
        fingerprint(model, ["bert.nope"])


def test_index_out_of_range_is_refused(model: nn.Module) -> None:
    delta = make_delta(model)
    name = next(iter(delta.modules))
    numel = model.get_submodule(name).weight.numel()
    indices, values = delta.modules[name]
    delta.modules[name] = (
        torch.cat([indices[:-1], torch.tensor([numel], dtype=torch.int32)]),
        values,
    )
    with pytest.raises(DeltaMismatchError, match=f"{name}.*out of range"):
        apply_delta(model, delta, verify=False)


@pytest.mark.parametrize(
    ("edit", "error", "fragment"),
    [
        (
            lambda d: d.modules.update(
                {"bert.encoder.layer.9.output.dense": next(iter(d.modules.values()))}
            ),
            DeltaMismatchError,
            "does not exist",
        ),
        (
            lambda d: d.modules.update(
                {"bert.encoder.layer.0.attention.output.dropout": next(iter(d.modules.values()))}
            ),
            DeltaMismatchError,
            "has no weight",
        ),
        (
            lambda d: d.extras.update({"classifier.weight": torch.zeros(3, 16)}),
            DeltaMismatchError,
            "shape",
        ),
        (
            lambda d: d.extras.update({"classifier.missing": torch.zeros(2)}),
            DeltaMismatchError,
            "no such parameter",
        ),
        (
            lambda d: d.modules.update({k: (i.long(), v) for k, (i, v) in d.modules.items()}),
            DeltaFormatError,
            "must be torch.int32",
        ),
        (
            lambda d: d.modules.update({k: (i.flip(0), v) for k, (i, v) in d.modules.items()}),
            DeltaFormatError,
            "sorted",
        ),
        (
            lambda d: d.modules.update({k: (i, v.long()) for k, (i, v) in d.modules.items()}),
            DeltaFormatError,
            "floating point",
        ),
        (lambda d: d.metadata.pop("base_fingerprint"), DeltaFormatError, "base_fingerprint"),
    ],
)
def test_verify_refuses_deltas_that_do_not_fit(
    model: nn.Module, edit, error: type, fragment: str
) -> None:
    delta = make_delta(model)
    edit(delta)
    before = state_copy(model)
    with pytest.raises(error, match=fragment):
        verify_delta(model, delta)
    with pytest.raises(error):
        apply_delta(model, delta)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# --- refusals of corrupt files --------------------------------------------------------------------


def valid_parts(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a valid file, for building corrupt variants."""
    delta = make_delta(model, per_module=5)
    tensors = {}
    for name, (indices, values) in delta.modules.items():
        tensors[f"{name}.indices"] = indices
        tensors[f"{name}.values"] = values
    tensors.update({f"extra.{k}": v for k, v in delta.extras.items()})
    metadata = {**delta.metadata, "format": FORMAT, "nnz": str(delta.nnz)}
    return tensors, metadata


NAME = "bert.encoder.layer.0.attention.self.query"


def _drop(key: str):
    return lambda t, m: t.pop(key)


def _set(key: str, value):
    return lambda t, m: t.__setitem__(key, value)


def _meta(key: str, value: str | None):
    return lambda t, m: m.pop(key) if value is None else m.__setitem__(key, value)


CORRUPTIONS = {
    "indices_without_values": (
        _drop(f"{NAME}.values"),
        "no 'bert.encoder.layer.0.attention.self.query.values'",
    ),
    "values_without_indices": (
        _drop(f"{NAME}.indices"),
        "no 'bert.encoder.layer.0.attention.self.query.indices'",
    ),
    "length_mismatch": (_set(f"{NAME}.values", torch.zeros(4)), "5 indices but 4 values"),
    "float_indices": (
        _set(f"{NAME}.indices", torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])),
        "int32 or int64",
    ),
    "unsorted_indices": (
        _set(f"{NAME}.indices", torch.tensor([0, 2, 1, 3, 4], dtype=torch.int32)),
        "sorted",
    ),
    "duplicate_indices": (
        _set(f"{NAME}.indices", torch.tensor([0, 1, 1, 3, 4], dtype=torch.int32)),
        "duplicates",
    ),
    "negative_index": (
        _set(f"{NAME}.indices", torch.tensor([-1, 1, 2, 3, 4], dtype=torch.int32)),
        "negative",
    ),
    "nan_value": (
        _set(f"{NAME}.values", torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0])),
        "NaN or Inf",
    ),
    "inf_value": (
        _set(f"{NAME}.values", torch.tensor([0.0, float("inf"), 0.0, 0.0, 0.0])),
        "NaN or Inf",
    ),
    "nan_extra": (_set("extra.classifier.bias", torch.tensor([float("nan"), 0.0])), "NaN or Inf"),
    "unexpected_tensor": (_set("stray", torch.zeros(1)), "unexpected tensor 'stray'"),
    "wrong_format": (_meta("format", "speft-delta/2"), "speft-delta/2"),
    "nnz_mismatch": (_meta("nnz", "3"), "nnz"),
    "labels_not_json": (_meta("labels", "[negative"), "labels is not JSON"),
    "labels_nested_deep": (_meta("labels", "[" * 100_000), "labels is not JSON"),
    "labels_huge_integer": (_meta("labels", "[" + "7" * 5000 + "]"), "labels is not JSON"),
    "labels_not_strings": (_meta("labels", "[0, 1]"), "list of strings"),
    "bad_fingerprint": (_meta("base_fingerprint", "abc"), "base_fingerprint"),
    "unknown_task": (_meta("task", "regression"), "task"),
    **{f"missing_{key}": (_meta(key, None), f"missing '{key}'") for key in REQUIRED_METADATA},
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_file_is_refused(model: nn.Module, case: str) -> None:
    tensors, metadata = valid_parts(model)
    corrupt, fragment = CORRUPTIONS[case]
    corrupt(tensors, metadata)
    with pytest.raises(DeltaFormatError, match=fragment.replace("[", r"\[")):
        load_delta(safetensors_save(tensors, metadata=metadata))


def test_unbuilt_corrupt_deltas_are_refused_on_save(model: nn.Module) -> None:
    delta = make_delta(model)
    delta.metadata["nnz"] = "1"
    with pytest.raises(DeltaFormatError, match="nnz"):
        delta_to_bytes(delta)
    delta = make_delta(model)
    delta.metadata.pop("labels")
    with pytest.raises(DeltaFormatError, match="labels"):
        delta_to_bytes(delta)
    delta = make_delta(model)
    delta.modules["extra.head"] = next(iter(delta.modules.values()))
    with pytest.raises(DeltaFormatError, match="extra."):
        delta_to_bytes(delta)


@pytest.mark.parametrize("cut", [0, 4, 8, 20, 200, -1, -100])
def test_truncated_bytes_are_refused(model: nn.Module, cut: int) -> None:
    blob = delta_to_bytes(make_delta(model))
    with pytest.raises(DeltaFormatError):
        load_delta(blob[:cut])


def _header_only(header: dict) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text


@pytest.mark.parametrize(
    "blob",
    [
        b"not a safetensors file at all",
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json....}!!",
        b"\x02\x00\x00\x00\x00\x00\x00\x00[]",
        b"\xff" * 64,
        _header_only({"t.values": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}})
        + b"\0" * 4,
    ],
)
def test_non_safetensors_bytes_are_refused(blob: bytes) -> None:
    with pytest.raises(DeltaFormatError):
        load_delta(blob)


def test_trailing_bytes_are_refused(model: nn.Module) -> None:
    with pytest.raises(DeltaFormatError, match="truncated or padded"):
        load_delta(delta_to_bytes(make_delta(model)) + b"\x00" * 8)
