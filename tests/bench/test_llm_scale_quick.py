"""bench/llm_scale.py's quick mode runs every method with checkpointing off and on, end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_llm_scale_quick_mode_runs_every_method_and_scores_within_bound(tmp_path):
    out = tmp_path / "llm_scale.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "llm_scale.py"), "--quick",
                    "--out", str(out)], check=True, cwd=REPO, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    rows = {(r["method"], r["checkpointing"]): r for r in report["results"]}
    assert set(rows) == {(m, c) for m in ("speft", "lora_r16", "full") for c in ("off", "on")}
    scoring = report["scoring"]["tiny"]
    for row in rows.values():
        assert row["step_ms"] > 0 and row["peak_mem_mib"] >= 0 and row["file_bytes"] > 0
    # SPEFT trains 1% of the targeted weights, in fp32 over the bf16 base; full trains all
    assert rows["speft", "off"]["trainable_params"] == scoring["k"]
    assert scoring["k"] == round(0.01 * scoring["targeted_weights"])
    assert rows["speft", "off"]["trainable_dtypes"] == ["float32"]
    assert rows["full", "off"]["trainable_dtypes"] == ["bfloat16"]
    assert rows["full", "off"]["trainable_params"] == scoring["parameters"]
    assert (rows["speft", "off"]["trainable_state_bytes"]
            < rows["lora_r16", "off"]["trainable_state_bytes"])
    assert scoring["scoring_within_bound"]
    assert {t["target"] for t in report["targets"]} == {
        "training peak memory vs lora_r16", "step time vs lora_r16"}
