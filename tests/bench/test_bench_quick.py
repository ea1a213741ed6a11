"""The benchmark suite's quick mode runs end to end on real data and draws its plots."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quality_quick_mode_compares_every_family_and_plots(tmp_path, data_dir, stories_dir):
    out = tmp_path / "quality.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--quick",
                    "--tasks", "sst5", "alpaca-chat", "--out", str(out)],
                   check=True, cwd=REPO, capture_output=True, timeout=900,
                   env={**os.environ, "SPEFT_DATA_DIR": str(data_dir),
                        "SPEFT_MODELS_DIR": str(stories_dir.parent)})
    report = json.loads(out.read_text())
    sst5 = {row["method"]: row for row in report["tasks"]["sst5"]["summary"]}
    assert set(sst5) == {"full", "lora-r8", "lora-budget", "speft-gradient", "speft-random",
                         "speft-magnitude"}
    for row in sst5.values():
        assert 0.0 <= row["test_eval_accuracy"] <= 1.0 and 0.0 <= row["dev_eval_accuracy"] <= 1.0
    params = {name: row["trainable_params"] for name, row in sst5.items()}
    # SPEFT at 1% of the targeted weights plus the 5-label head; LoRA's budget rank lands
    # closer to it than r=8 does; full fine-tuning trains everything
    assert params["speft-gradient"] == params["speft-random"] == params["speft-magnitude"]
    assert (abs(params["lora-budget"] - params["speft-gradient"])
            < abs(params["lora-r8"] - params["speft-gradient"]))
    assert params["full"] > 50 * params["lora-r8"]
    assert report["tasks"]["sst5"]["train_examples"] == 160
    chat = {row["method"]: row for row in report["tasks"]["alpaca-chat"]["summary"]}
    assert {"full", "lora-r1", "lora-r8", "speft-gradient-at-r1", "speft-gradient-at-r8"} <= set(chat)
    assert all(math.isfinite(row["test_eval_perplexity"]) for row in chat.values())
    # budget-matched SPEFT trains as many entries as LoRA at that rank has parameters
    assert chat["speft-gradient-at-r8"]["trainable_params"] == chat["lora-r8"]["trainable_params"]
    assert {row["method"] for row in report["across_tasks"]} == set(sst5) | set(chat)
    assert {check["task"] for check in report["targets"]} == {"sst5", "alpaca-chat"}

    subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--plots-only",
                    "--results", str(tmp_path)], check=True, cwd=REPO, capture_output=True)
    plot = tmp_path / "quality_accuracy_vs_params.png"
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
