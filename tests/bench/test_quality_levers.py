"""The lever screen's ranking: cells that are another lever's runs exactly (SAME_AS) are
filled from it, and ranks are taken per task over every lever with a cell there."""
from __future__ import annotations

import math
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
    assert result["table"]["auto-mask"]["sst2"]["same_as"] == "default+spread-4"
    assert "tinyshakespeare" not in result["table"]["auto-mask"]  # no default+dynamic cell
    ranks = {row["lever"]: row["dev_rank"] for row in result["ranking"]}
    # auto-spread and auto-mask tie with their source on SST-2 (ranks 3 to 5)
    assert ranks["auto-spread"] == {"sst2": 4, "tinyshakespeare": 1.5}
    assert ranks["auto-mask"] == {"sst2": 4}
    assert ranks["baseline"] == {"sst2": 6, "tinyshakespeare": 4.5}
    assert result["levers"]["auto-spread"] == LEVERS["auto-spread"]


def test_a_lever_that_was_not_screened_gets_no_borrowed_cells():
    table = {"baseline": {"tinyshakespeare": _cell(-3.37)}}
    assert "head-warmup" not in rank_levers(table, ["tinyshakespeare"])["table"]
    assert set(SAME_AS["auto-spread"]) == {"classification", "causal_lm"}


def test_ranks_treat_float_noise_as_a_tie():
    assert dev_ranks({"a": -3.6534912, "b": -3.6534914, "c": -3.7}) == {"a": 1.5, "b": 1.5,
                                                                         "c": 3}


def test_the_auto_mask_on_the_decoders_is_the_dynamic_levers_runs():
    """SAME_AS fills auto-mask's decoder cells with default+dynamic's: the auto interval must
    come out at that lever's 8 steps on every decoder task of the suite."""
    from quality_tasks import TASKS, load_task

    from speft_core.config import SpeftConfig

    auto, dynamic = SpeftConfig(**LEVERS["auto-mask"]), SpeftConfig(**LEVERS["default+dynamic"])
    assert SAME_AS["auto-mask"]["causal_lm"] == "default+dynamic"
    decoders = [spec for spec in TASKS.values() if spec.is_decoder]
    assert decoders
    for spec in decoders:
        protocol = spec.protocol
        total = math.ceil(len(load_task(spec).train) / protocol.batch_size) * protocol.epochs
        assert auto.mask_for(spec.task) == dynamic.mask_for(spec.task) == "dynamic"
        assert auto.update_interval_for(total) == dynamic.update_interval == 8, spec.name
    assert auto.mask_for("classification") == "static"
