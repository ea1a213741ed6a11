"""The lever screen's ranking: cells that are another lever's runs exactly (SAME_AS) are
filled from it, and ranks are taken per task over every lever with a cell there."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from quality import LEVERS, SAME_AS, dev_ranks, rank_levers


def _cell(dev: float) -> dict:
    return {"lr": 0.01, "dev": dev, "interior": True, "runs": []}


def test_composed_and_head_only_levers_take_their_sources_cells():
    table = {"baseline": {"sst2": _cell(0.79), "tinyshakespeare": _cell(-3.37)},
             "head-warmup": {"sst2": _cell(0.81)},
             "warmup+norm": {"sst2": _cell(0.82), "tinyshakespeare": _cell(-3.27)},
             "default+spread-4": {"sst2": _cell(0.80), "tinyshakespeare": _cell(-3.32)}}
    result = rank_levers(table, ["sst2", "tinyshakespeare"])
    auto = result["table"]["auto-spread"]
    assert auto["sst2"]["dev"] == 0.80 and auto["sst2"]["same_as"] == "default+spread-4"
    assert auto["tinyshakespeare"]["dev"] == -3.27
    assert auto["tinyshakespeare"]["same_as"] == "warmup+norm"
    assert result["table"]["head-warmup"]["tinyshakespeare"]["same_as"] == "baseline"
    ranks = {row["lever"]: row["dev_rank"] for row in result["ranking"]}
    assert ranks["auto-spread"] == {"sst2": 3.5, "tinyshakespeare": 1.5}  # ties with sources
    assert ranks["baseline"] == {"sst2": 5, "tinyshakespeare": 4.5}
    assert result["levers"]["auto-spread"] == LEVERS["auto-spread"]


def test_a_lever_that_was_not_screened_gets_no_borrowed_cells():
    table = {"baseline": {"tinyshakespeare": _cell(-3.37)}}
    assert "head-warmup" not in rank_levers(table, ["tinyshakespeare"])["table"]
    assert set(SAME_AS["auto-spread"]) == {"classification", "causal_lm"}


def test_ranks_treat_float_noise_as_a_tie():
    assert dev_ranks({"a": -3.6534912, "b": -3.6534914, "c": -3.7}) == {"a": 1.5, "b": 1.5,
                                                                         "c": 3}
