"""Shared fixtures: real data and model locations, tiny models built from configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton's interpreter runs the GPU kernels on CPU tensors (tests/core/test_triton_kernels.py).
# It must be on before anything imports Triton: transformers does at model load, and Triton
# reads the setting once, so a later change would leave its own helpers (tl.sum) compiled.
os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent

# Fixtures that start real services live in their own modules.
pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.databases"]


def _shared(env: str, default: str) -> Path:
    return Path(os.environ.get(env, str(REPO.parent / "shared" / default))).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data (or $SPEFT_DATA_DIR); skips where absent (CI always has it)."""
    path = _shared("SPEFT_DATA_DIR", "data")
    if not (path / "sst2" / "train.jsonl").exists():
        pytest.skip(f"real data not found at {path} (set SPEFT_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """../shared/models/stories260k (or $SPEFT_MODELS_DIR/stories260k); skips where absent."""
    path = _shared("SPEFT_MODELS_DIR", "models") / "stories260k"
    if not (path / "config.json").exists():
        pytest.skip(f"stories260k not found at {path} (set SPEFT_MODELS_DIR)")
    return path
