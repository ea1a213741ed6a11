"""`speft train SPEC.json --out DELTA.safetensors` as a user runs it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from speft_core.delta import load_delta

SPEFT = [sys.executable, "-m", "speft_core.cli"]


def _write_subset(src: Path, dst: Path, n: int) -> None:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))


@pytest.mark.slow
def test_speft_train_writes_a_delta_with_relative_paths(tmp_path, data_dir):
    _write_subset(data_dir / "sst2" / "train.jsonl", tmp_path / "train.jsonl", 96)
    _write_subset(data_dir / "sst2" / "dev.jsonl", tmp_path / "dev.jsonl", 64)
    spec = {"model": "minilm-l6", "training_file": "train.jsonl", "validation_file": "dev.jsonl",
            "method": {"type": "speft", "speft": {"metric": "magnitude", "density": 2000}},
            "hyperparameters": {"n_epochs": 1, "batch_size": 32, "max_length": 32}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out.safetensors"
    proc = subprocess.run([*SPEFT, "train", str(tmp_path / "spec.json"), "--out", str(out), "-q"],
                          capture_output=True, text=True, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["nnz"] == 2000 and summary["steps"] == 3
    delta = load_delta(out)
    assert delta.nnz == 2000 and delta.metadata["metric"] == "magnitude"
    assert set(delta.extras) == {"classifier.weight", "classifier.bias"}


def test_speft_train_bad_spec_names_the_field(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps(
        {"model": "minilm-l6", "training_file": "t.jsonl", "method": {"speft": {"density": 0}}}))
    proc = subprocess.run([*SPEFT, "train", str(tmp_path / "spec.json"), "--out", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "method.speft.density" in proc.stderr


def test_speft_train_missing_data_file_is_clear(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps({"model": "minilm-l6", "training_file": "nope.jsonl"}))
    proc = subprocess.run([*SPEFT, "train", str(tmp_path / "spec.json"), "--out", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nope.jsonl" in proc.stderr


@pytest.mark.parametrize("text", ["[" * 100_000, '{"seed": ' + "7" * 5000 + "}"],
                         ids=["nested 100,000 deep", "5,000-digit integer"])
def test_speft_train_spec_python_cannot_parse_is_a_clear_error(tmp_path, text):
    (tmp_path / "spec.json").write_text(text)
    proc = subprocess.run([*SPEFT, "train", str(tmp_path / "spec.json"), "--out", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot read" in proc.stderr, proc.stderr
