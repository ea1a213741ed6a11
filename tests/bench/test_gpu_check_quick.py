"""bench/gpu_check.py's smoke form: every check it runs on the GPU, on the CPU through Triton's
interpreter, so the script a GPU session depends on cannot rot unnoticed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_every_check_and_they_pass(tmp_path, stories_dir):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
         "--models", str(stories_dir), "--out", str(out)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1", "SPEFT_TRITON": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"]
    assert {row["dtype"] for row in report["sampled_grad"]} == {"float32", "bfloat16"}
    assert {row["tokens_per_row"] for row in report["segment_add"]} == {1, 5}
    served = report["served"][0]
    assert served["base_bit_identical"] and served["max_rel_error_vs_merged"] < 1e-4
    for row in report["sampled_grad"] + report["segment_add"]:
        assert row["triton_ms"] > 0 and row["max_rel_error"] < 0.05
