"""bench/mask_spread.py measures real masks: on the quick SST-2 subset the capped recipe's
entries are spread over more features than the uncapped one's, and its numbers are shares."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from mask_spread import busiest_share, main, weighted_median


def test_busiest_share_of_a_block_and_of_a_spread():
    block = torch.tensor([r * 40 + c for r in range(4) for c in range(2)])  # 2 of 40 columns
    assert busiest_share(block, 40, of_rows=False, cols=40) == 1.0
    spread = torch.arange(40) * 41  # one entry per row and per column of a 40 x 40 matrix
    assert busiest_share(spread, 40, of_rows=False, cols=40) == pytest.approx(2 / 40)
    assert busiest_share(spread, 40, of_rows=True, cols=40) == pytest.approx(2 / 40)
    assert weighted_median([0.1, 0.9, 0.5], [1, 1, 5]) == 0.5


def test_quick_run_writes_the_table_and_the_cap_spreads_the_mask(tmp_path, capsys):
    out = tmp_path / "spread.json"
    report = main(["--quick", "--tasks", "sst2", "--recipes", "uncapped", "spread-2",
                   "--threads", "1", "--out", str(out)])
    cells = json.loads(out.read_text())["table"]["sst2"]
    assert cells == report["table"]["sst2"]
    assert cells["uncapped"]["nnz"] == cells["spread-2"]["nnz"] > 0
    assert cells["spread-2"]["busiest_cols_share"] < cells["uncapped"]["busiest_cols_share"]
    assert all(0 < c[k] <= 1 for c in cells.values()
               for k in ("busiest_cols_share", "busiest_rows_share"))
    assert "| sst2 |" in capsys.readouterr().out
