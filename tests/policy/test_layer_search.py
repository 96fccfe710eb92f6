"""Iterative and beam layer searches, and the latency budget, on a tiny Llama."""
from __future__ import annotations

import copy
import itertools

import pytest
from tiny import tiny_model, tiny_windows

from mi_opt.errors import MiOptError
from mi_opt.policy import make_plan
from mi_opt.policy.latency import LayerLatency, measure_layer_latency
from mi_opt.policy.layer_search import beam
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.profile.scorers import run_scorer
from mi_opt.surgery.layers import drop_layers_

OPEN = {"protect_first": 0, "protect_last": 0}


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    windows = tiny_windows(4, 16)
    profile = profile_ablation(model, windows, AblationConfig(unit_kinds=("layer",)), progress=False)
    return model, windows, profile


def _loss_without(model, windows, drop) -> float:
    shrunk = drop_layers_(copy.deepcopy(model), list(drop))
    return profile_ablation(shrunk, windows, AblationConfig(unit_kinds=("layer",)), progress=False).base_loss


def test_wide_beam_finds_the_exhaustive_best_pair(setup):
    model, windows, profile = setup
    plan = make_plan(profile, "layer-skip", {"n_drop": 2, "beam_width": 4, **OPEN}, model, windows=windows,
                     progress=False)
    losses = {pair: _loss_without(model, windows, pair) for pair in itertools.combinations(range(4), 2)}
    best = min(losses, key=losses.get)
    assert plan.drop_layers == list(best)
    depth2 = plan.planner["rounds"][1]
    assert depth2["calibration_loss"] == pytest.approx(losses[best], abs=1e-4)
    assert depth2["forward_equivalents"] > plan.planner["rounds"][0]["forward_equivalents"] > 0


def test_beam_of_width_one_is_greedy_on_calibration_loss(setup):
    model, windows, profile = setup
    narrow, _ = beam(list(range(4)), 2, 1, model, windows, {}, None, progress=False)
    greedy = make_plan(profile, "layer-skip", {"n_drop": 2, "iterative": True, **OPEN}, model, windows=windows,
                       progress=False)
    assert sorted(narrow) == greedy.drop_layers


def test_iterative_rescoring_with_block_influence(setup):
    model, windows, profile = setup
    bi = run_scorer("block_influence", model, windows, progress=False)
    plan = make_plan(bi, "layer-skip", {"n_drop": 2, "iterative": True, "rescore": "block_influence", **OPEN},
                     model, windows=windows, progress=False)
    first = min(range(4), key=lambda i: bi.score(f"L{i}"))
    shrunk = drop_layers_(copy.deepcopy(model), [first])
    again = run_scorer("block_influence", shrunk, windows, progress=False)
    alive = [i for i in range(4) if i != first]
    second = alive[min(range(3), key=lambda j: again.score(f"L{j}"))]
    assert plan.drop_layers == sorted([first, second])


def test_candidates_limit_what_each_round_rescores(setup):
    model, windows, profile = setup
    plan = make_plan(profile, "layer-skip", {"n_drop": 3, "iterative": True, "candidates": 2, **OPEN}, model,
                     windows=windows, progress=False)
    rounds = plan.planner["rounds"]
    assert len(rounds[0]["scores"]) == 4                      # the starting profile: every layer
    assert all(len(r["scores"]) == 2 for r in rounds[1:])     # then only the two lowest-ranked
    assert all(r["dropped"][0] in [int(k[1:]) for k in r["scores"]] for r in rounds)
    full = make_plan(profile, "layer-skip", {"n_drop": 3, "iterative": True, **OPEN}, model, windows=windows,
                     progress=False)
    assert rounds[-1]["forward_equivalents"] < full.planner["rounds"][-1]["forward_equivalents"]


def test_latency_model_arithmetic():
    lat = LayerLatency(n_layers=10, full_ms=12.0, per_layer_ms=1.0, fixed_ms=2.0)
    assert lat.after(3) == pytest.approx(9.0)
    assert lat.layers_to_drop(0.75) == 3          # 12 -> 9 ms
    assert lat.layers_to_drop(0.7) == 4           # 8.4 ms needs 3.6 -> 4 layers
    assert lat.layers_to_drop(1.0) == 0
    with pytest.raises(MiOptError, match="not make decoding measurably faster"):
        LayerLatency(n_layers=10, full_ms=12.0, per_layer_ms=0.0, fixed_ms=12.0).layers_to_drop(0.5)


def test_latency_budget_plans_from_the_latency_model(setup, monkeypatch):
    model, windows, profile = setup
    # Timings of a tiny model are noise; the planner's use of the fit is what is tested here.
    fitted = LayerLatency(n_layers=4, full_ms=10.0, per_layer_ms=2.0, fixed_ms=2.0)
    monkeypatch.setattr("mi_opt.policy.layer_skip.measure_layer_latency", lambda m: fitted)
    plan = make_plan(profile, "layer-skip", {"target_latency_fraction": 0.65, **OPEN}, model, progress=False)
    assert plan.budget == {"target_latency_fraction": 0.65}
    assert len(plan.drop_layers) == 2                               # 10 ms -> 6 ms <= 6.5 ms
    assert plan.predicted["decode_ms_per_token"] == pytest.approx(6.0)
    assert plan.predicted["latency_model"]["per_layer_ms"] == 2.0
    with pytest.raises(MiOptError, match="latency budget needs 4 layers dropped"):
        make_plan(profile, "layer-skip", {"target_latency_fraction": 0.2}, model, progress=False)


def test_measured_latency_model_is_consistent(setup):
    model, _, _ = setup
    lat = measure_layer_latency(model, prompt_len=8, new_tokens=3, repetitions=2)
    assert lat.n_layers == 4 and lat.full_ms > 0
    assert lat.fixed_ms + 4 * lat.per_layer_ms == pytest.approx(lat.full_ms)


def test_bad_search_options_raise(setup):
    model, windows, profile = setup
    with pytest.raises(MiOptError, match="metric: delta_loss"):
        make_plan(profile, "layer-skip", {"n_drop": 1, "beam_width": 2, "metric": "kl"}, model, windows=windows)
    with pytest.raises(MiOptError, match="candidates must be >= 1"):
        make_plan(profile, "layer-skip", {"n_drop": 1, "iterative": True, "candidates": 0}, model, windows=windows)
    with pytest.raises(MiOptError, match="Did you mean"):
        make_plan(profile, "layer-skip", {"n_drop": 1, "iterative": True, "rescore": "ablations"}, model)
    with pytest.raises(MiOptError, match="needs calibration windows|calibration"):
        make_plan(profile, "layer-skip", {"n_drop": 1, "beam_width": 2}, model)
    with pytest.raises(MiOptError, match="target_latency_fraction must be in"):
        make_plan(profile, "layer-skip", {"target_latency_fraction": 1.5}, model)


def test_beam_candidates_come_from_the_first_full_ranking(setup):
    model, windows, _ = setup
    _, rounds = beam(list(range(4)), 3, 2, model, windows, {}, 2, progress=False)
    first = profile_ablation(model, windows, AblationConfig(unit_kinds=("layer",)), progress=False)
    rank = {i: (first.score(f"L{i}"), i) for i in range(4)}
    for parents, children in zip(rounds, rounds[1:]):
        for child in children["beam"]:
            # Each state extends a parent by one of the 2 layers ranked lowest at depth 1 among those left.
            extends = []
            for parent in parents["beam"]:
                added = set(child["drop"]) - set(parent["drop"])
                left = sorted((i for i in range(4) if i not in parent["drop"]), key=rank.get)
                if set(parent["drop"]) <= set(child["drop"]) and added <= set(left[:2]):
                    extends.append(parent)
            assert extends, (child, parents["beam"])
