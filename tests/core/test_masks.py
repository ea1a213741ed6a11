"""Top-k selection and dynamic drop/grow."""
from __future__ import annotations

import pytest
import torch

from speft_core.config import SpeftConfig
from speft_core.errors import ConfigError
from speft_core.masks import (
    choose_mask,
    drop_and_grow,
    per_layer_counts,
    select_mask,
    select_topk_global,
)
from speft_core.spread import capped_top


def test_global_topk_spans_modules_and_is_sorted():
    scores = {"a": torch.tensor([[0.1, 0.9], [0.5, 0.2]]), "b": torch.tensor([[0.8, 0.0, 0.7]])}
    masks = select_topk_global(scores, 3)
    assert masks["a"].tolist() == [1] and masks["b"].tolist() == [0, 2]
    assert masks["a"].dtype == torch.int32


def test_ties_are_broken_by_position_deterministically():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(1, 3)}
    assert select_topk_global(scores, 4)["a"].tolist() == [0, 1, 2, 3]
    assert select_topk_global(scores, 4)["b"].tolist() == []
    assert select_topk_global(scores, 7)["b"].tolist() == [0]


def test_nan_scores_rank_last():
    masks = select_topk_global({"a": torch.tensor([[float("nan"), 1.0, 0.5]])}, 2)
    assert masks["a"].tolist() == [1, 2]


def test_density_fraction_and_absolute_count():
    scores = {"a": torch.rand(10, 10), "b": torch.rand(10, 30)}
    assert sum(m.numel() for m in select_mask(scores, 0.05).values()) == 20
    assert sum(m.numel() for m in select_mask(scores, 37).values()) == 37
    with pytest.raises(ConfigError) as err:
        select_mask(scores, 401)
    assert err.value.param == "density"


def test_per_layer_gives_each_module_its_share():
    assert per_layer_counts({"a": 100, "b": 300}, 0.1) == {"a": 10, "b": 30}
    assert sum(per_layer_counts({"a": 7, "b": 7, "c": 7}, 10).values()) == 10
    scores = {"a": torch.arange(100.0).view(10, 10), "b": -torch.arange(300.0).view(10, 30)}
    masks = select_mask(scores, 0.1, scope="layer")
    assert masks["a"].tolist() == list(range(90, 100))
    assert masks["b"].tolist() == list(range(30))


def test_drop_and_grow_moves_the_mask_and_keeps_values():
    current = {"a": (torch.tensor([0, 1, 2, 3], dtype=torch.int32), torch.tensor([0.9, -0.01, 0.5, 0.02]))}
    scores = {"a": torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, 1.0, 9.0, 0.0]])}
    update = drop_and_grow(current, scores, 0.5)["a"]
    assert update.indices.tolist() == [0, 2, 4, 6]  # dropped 1 and 3, grew 6 and 4
    assert update.values.tolist() == [pytest.approx(0.9), pytest.approx(0.5), 0.0, 0.0]
    assert update.source.tolist() == [0, 2, -1, -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_and_grow_consuming_the_scores_chooses_the_same_without_a_copy(dtype):
    generator = torch.Generator().manual_seed(0)
    current = {n: (torch.tensor([1, 5, 7, 20], dtype=torch.int32), torch.randn(4, generator=generator))
               for n in ("a", "b")}
    scores = {n: torch.rand(6, 8, generator=generator).to(dtype) for n in ("a", "b")}
    kept = {n: s.clone() for n, s in scores.items()}
    copied = drop_and_grow(current, kept, 0.5)
    assert all(torch.equal(kept[n], scores[n]) for n in scores)  # left as they were
    consumed = drop_and_grow(current, scores, 0.5, consume_scores=True)
    for name in current:
        assert torch.equal(consumed[name].indices, copied[name].indices)
        assert torch.equal(consumed[name].values, copied[name].values)
        assert torch.isinf(scores[name].reshape(-1)[current[name][0].long()]).all()  # spent


def test_global_drop_and_grow_can_move_budget_between_modules():
    current = {
        "a": (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0.001, 0.002])),
        "b": (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1.0, 2.0])),
    }
    scores = {"a": torch.zeros(1, 4), "b": torch.tensor([[0.0, 0.0, 3.0, 4.0]])}
    updates = drop_and_grow(current, scores, 0.5)
    assert updates["a"].indices.numel() == 0
    assert updates["b"].indices.tolist() == [0, 1, 2, 3]


def _reference_top_positions(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Stable sort of the joined scores, NaN lowest and +inf as the largest finite float."""
    joined = torch.cat([t.reshape(-1).float() for t in tensors])
    joined = torch.nan_to_num(joined, nan=float("-inf")) + 0.0
    chosen = torch.sort(torch.sort(joined, descending=True, stable=True).indices[:k]).values
    out, start = [], 0
    for t in tensors:
        inside = chosen[(chosen >= start) & (chosen < start + t.numel())]
        out.append(inside - start)
        start += t.numel()
    return out


@pytest.mark.parametrize("trial", range(6))
def test_chunked_radix_select_equals_a_full_sort(trial: int, monkeypatch):
    from speft_core import topk

    monkeypatch.setattr(topk, "CHUNK", 37)  # many chunks, none aligned with a tensor
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs each run
    pool = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.0, -1.0,
                         torch.finfo(torch.float32).max, 1e-40, -1e-40])
    tensors = []
    for shape in [(5, 7), (0,), (13,), (3, 31), (1, 1)]:
        values = torch.randn(shape, generator=generator)
        if trial % 2:  # heavy ties and specials
            values = pool[torch.randint(0, pool.numel(), shape, generator=generator)]
        if trial == 4:
            values = values.to(torch.bfloat16)
        tensors.append(values)
    total = sum(t.numel() for t in tensors)
    for k in [0, 1, 2, total // 3, total - 1, total, total + 5]:
        got = topk.top_positions(tensors, k)
        want = _reference_top_positions(tensors, min(k, total))
        assert [g.tolist() for g in got] == [w.tolist() for w in want], (trial, k)


# --- the selection recipe: normalisation, module floor, exploration -------------------------


def _scores(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(20, 30, generator=generator) * 1000,  # a module on a larger scale
            "b": torch.rand(40, 10, generator=generator), "c": torch.rand(8, 8, generator=generator)}


def _copy(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: s.clone() for n, s in scores.items()}


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_without_levers_the_recipe_is_plain_top_k(scope: str):
    scores = _scores(1)
    plain = select_mask(_copy(scores), 0.05, scope)
    chosen = choose_mask(_copy(scores), SpeftConfig(density=0.05, scope=scope,
                                                    score_normalization="none"), seed=0)
    assert {n: m.tolist() for n, m in chosen.items()} == {n: m.tolist() for n, m in plain.items()}


def test_module_normalisation_stops_one_scale_crowding_out_the_rest():
    scores = _scores(2)
    plain = choose_mask(_copy(scores), SpeftConfig(density=0.05, score_normalization="none"),
                        seed=0)
    assert plain["b"].numel() == plain["c"].numel() == 0  # 'a' takes the whole budget
    normalised = choose_mask(_copy(scores), SpeftConfig(density=0.05,
                                                        score_normalization="module"), seed=0)
    assert sum(m.numel() for m in normalised.values()) == round(0.05 * 1064)
    assert normalised["b"].numel() >= 5 and normalised["a"].numel() <= 45  # ~20 and ~30 expected
    b = scores["b"].reshape(-1)  # within a module the order is unchanged: its own top entries
    assert set(normalised["b"].tolist()) == set(b.topk(normalised["b"].numel()).indices.tolist())


def test_a_module_floor_of_one_is_per_layer_and_a_partial_floor_reaches_every_module():
    scores = _scores(3)
    full_floor = choose_mask(_copy(scores), SpeftConfig(density=0.05, module_floor=1.0,
                                                        score_normalization="none"), seed=0)
    per_layer = select_mask(_copy(scores), 0.05, "layer")
    assert {n: m.tolist() for n, m in full_floor.items()} == {n: m.tolist() for n, m in per_layer.items()}
    half = choose_mask(_copy(scores), SpeftConfig(density=0.05, module_floor=0.5,
                                                  score_normalization="none"), seed=0)
    k = round(0.05 * 1064)
    assert sum(m.numel() for m in half.values()) == k
    floor = per_layer_counts({"a": 600, "b": 400, "c": 64}, round(0.5 * k))
    assert all(half[n].numel() >= floor[n] for n in "abc")
    assert all(torch.equal(m, torch.unique(m)) for m in half.values())  # sorted, no repeats


def test_exploration_adds_seeded_random_entries_outside_the_salience_choice():
    scores = _scores(4)
    k = round(0.1 * 1064)
    top_half = select_mask(_copy(scores), k - round(0.5 * k))
    speft = SpeftConfig(density=0.1, explore_fraction=0.5, score_normalization="none")
    first = choose_mask(_copy(scores), speft, seed=7)
    assert sum(m.numel() for m in first.values()) == k
    for name in scores:
        assert set(top_half[name].tolist()) <= set(first[name].tolist())
        assert torch.equal(first[name], torch.unique(first[name]))
    assert first["c"].numel() > 0  # random entries land outside the salient module too
    again = choose_mask(_copy(scores), speft, seed=7)
    other = choose_mask(_copy(scores), speft, seed=8)
    assert all(torch.equal(first[n], again[n]) for n in scores)
    assert any(not torch.equal(first[n], other[n]) for n in scores)


def test_exploration_can_fill_almost_every_weight():
    scores = _scores(5)
    chosen = choose_mask(_copy(scores), SpeftConfig(density=1.0, explore_fraction=0.9), seed=0)
    assert [m.tolist() for m in chosen.values()] == [list(range(s.numel())) for s in scores.values()]


def _outer_product_scores() -> torch.Tensor:
    """A rank-1 score, as summed gradients nearly are: one column and one row dominate."""
    rows, cols = torch.ones(40), torch.ones(50)
    rows[3], cols[7] = 100.0, 100.0
    return torch.outer(rows, cols) + 0.01 * torch.rand(40, 50, generator=torch.Generator().manual_seed(0))


def test_without_a_cap_a_dominant_feature_takes_the_budget_and_with_one_it_is_spread():
    score = _outer_product_scores()
    k = 100  # 5% of 2,000
    plain = choose_mask({"w": score.clone()}, SpeftConfig(density=k, score_normalization="none"),
                        seed=0)["w"].long()
    assert int((plain % 50 == 7).sum()) == 40  # the whole dominant column
    capped = choose_mask({"w": score.clone()}, SpeftConfig(density=k, spread_cap=2,
                                                           score_normalization="none"),
                         seed=0)["w"].long()
    assert capped.numel() == k
    per_column = torch.bincount(capped % 50, minlength=50)
    per_row = torch.bincount(capped // 50, minlength=40)
    assert int(per_column.max()) <= 4 and int(per_row.max()) <= 5  # ceil(2 * 5% * 40), ·50
    # within its cap the dominant column still gets its own largest entries: salience decides
    assert per_column[7] == 4 and per_row[3] == 5
    assert int(per_column.gt(0).sum()) >= 25


def test_capped_top_fills_the_budget_in_passes_within_every_cap():
    score = _outer_product_scores()
    chosen = capped_top({"w": score.clone()}, 100, fraction=0.05, cap=2.0)["w"]
    assert chosen.numel() == 100 and torch.equal(chosen, torch.unique(chosen))
    assert int(torch.bincount(chosen % 50).max()) <= 4
    assert int(torch.bincount(chosen // 50).max()) <= 5
    # the first pass is the plain top-k within the caps: the dominant row's 5 best columns
    assert set((chosen[chosen // 50 == 3] % 50).tolist()) == set(score[3].topk(5).indices.tolist())


@pytest.mark.parametrize("lines", ["inputs", "outputs"])
def test_spread_lines_caps_only_the_columns_or_only_the_rows(lines):
    score = _outer_product_scores()
    chosen = capped_top({"w": score}, 100, fraction=0.05, cap=2.0, lines=lines)["w"]
    per_row, per_col = torch.bincount(chosen // 50, minlength=40), torch.bincount(chosen % 50)
    assert chosen.numel() == 100
    if lines == "inputs":
        assert int(per_col.max()) <= 4 and int(per_row[3]) == 50  # the dominant row, whole
    else:
        assert int(per_row.max()) <= 5 and int(per_col[7]) == 40  # the dominant column, whole


def test_capped_top_ranks_across_modules_and_never_takes_nan_or_minus_inf():
    scores = {"a": torch.tensor([[9.0, 8.0], [7.0, float("nan")]]),
              "b": torch.tensor([[float("-inf"), 1.0, 6.0]])}
    chosen = capped_top(scores, 10, fraction=0.5, cap=2.0)  # room for every finite entry
    assert chosen["a"].tolist() == [0, 1, 2] and chosen["b"].tolist() == [1, 2]
    one_per_line = capped_top(scores, 10, fraction=0.5, cap=1.0)  # a: 1 a row, 1 a column
    assert one_per_line["a"].tolist() == [0] and one_per_line["b"].tolist() == [1, 2]


def test_a_cap_past_the_whole_line_is_the_plain_top_k():
    scores = {"w": _outer_product_scores(), "v": 200 * torch.rand(3, 4)}
    capped = capped_top(scores, 300, fraction=0.6, cap=2.0)  # rooms 60 a row, 48 a column
    plain = select_topk_global(scores, 300)
    assert {n: c.tolist() for n, c in capped.items()} == {n: p.long().tolist()
                                                         for n, p in plain.items()}


def test_spread_cap_with_a_module_floor_is_refused():
    with pytest.raises(ConfigError, match="module_floor") as err:
        SpeftConfig(spread_cap=4, module_floor=0.25)
    assert err.value.param == "spread_cap"


@pytest.mark.parametrize("field, value", [("spread_cap", 0.5), ("spread_cap", -1),
                                          ("spread_cap", 1001), ("spread_cap", float("nan")),
                                          ("spread_lines", "columns")])
def test_spread_settings_out_of_range_name_their_field(field, value):
    with pytest.raises(ConfigError, match=field) as err:
        SpeftConfig(**{field: value})
    assert err.value.param == field


@pytest.mark.parametrize("field, value", [("score_normalization", "zscore"),
                                          ("module_floor", 1.5), ("explore_fraction", 1.0),
                                          ("head_warmup_steps", -1)])
def test_recipe_settings_out_of_range_name_their_field(field: str, value):
    with pytest.raises(ConfigError) as err:
        SpeftConfig(**{field: value})
    assert err.value.param == field


def test_auto_mask_is_dynamic_on_causal_lm_and_static_on_classification():
    auto = SpeftConfig()
    assert auto.mask == "auto" and auto.update_interval == "auto"
    assert auto.mask_for("causal_lm") == "dynamic"
    assert auto.mask_for("classification") == "static"
    assert auto.mask_for(None) == "static"
    assert SpeftConfig(update_interval=0).mask_for("causal_lm") == "static"  # 0: never
    assert SpeftConfig(mask="static").mask_for("causal_lm") == "static"
    assert SpeftConfig(mask="dynamic").mask_for("classification") == "dynamic"


@pytest.mark.parametrize("total, interval", [(1, 8), (54, 8), (96, 8), (97, 9), (1200, 100),
                                             (10_001, 834)])
def test_auto_update_interval_spreads_about_twelve_updates_over_the_job(total, interval):
    assert SpeftConfig().update_interval_for(total) == interval
    assert SpeftConfig(update_interval=5).update_interval_for(total) == 5


@pytest.mark.parametrize("settings", [{"mask": "sometimes"}, {"update_interval": "often"},
                                      {"update_interval": -1},
                                      {"mask": "dynamic", "update_interval": 0}])
def test_mask_settings_out_of_range_name_their_field(settings):
    with pytest.raises(ConfigError) as err:
        SpeftConfig(**settings)
    assert err.value.param == list(settings)[-1]
