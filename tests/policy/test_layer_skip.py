"""Layer-skip planner: picks the least important layers, honours budgets and protection."""
from __future__ import annotations

import pytest
from tiny import tiny_model, tiny_windows

from mi_opt.errors import MiOptError
from mi_opt.policy import PLANNERS, make_plan
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.surgery import apply_


@pytest.fixture(scope="module")
def llama_and_profile():
    model = tiny_model("llama")
    profile = profile_ablation(model, tiny_windows(4, 16), AblationConfig(unit_kinds=("layer", "head")),
                               progress=False)
    return model, profile


def test_one_shot_drops_least_important_unprotected_layers(llama_and_profile):
    model, profile = llama_and_profile
    plan = make_plan(profile, "layer-skip", {"n_drop": 1, "protect_first": 0, "protect_last": 0}, model)
    scores = {i: profile.score(f"L{i}") for i in range(4)}
    assert plan.drop_layers == [min(scores, key=scores.get)]
    protected = make_plan(profile, "layer-skip", {"n_drop": 2, "protect_first": 1, "protect_last": 1}, model)
    assert protected.drop_layers == [1, 2]
    assert protected.predicted["n_layers"] == 2
    assert plan.model["fingerprint"] == profile.model["fingerprint"] and plan.planner["name"] == "layer-skip"


def test_parameter_budget_is_met_and_predicted_equals_actual(llama_and_profile):
    model, profile = llama_and_profile
    total = sum(p.numel() for p in model.parameters())
    plan = make_plan(profile, "layer-skip", {"target_fraction": 0.9, "protect_first": 0, "protect_last": 0}, model)
    assert plan.predicted["parameters"] <= 0.9 * total
    compressed = apply_(tiny_model("llama"), plan)
    assert sum(p.numel() for p in compressed.parameters()) == plan.predicted["parameters"]


def test_kl_metric_ranks_by_kl(llama_and_profile):
    model, profile = llama_and_profile
    plan = make_plan(profile, "layer-skip", {"n_drop": 1, "metric": "kl", "protect_first": 0, "protect_last": 0},
                     model)
    kl = {i: profile.score(f"L{i}", "kl") for i in range(4)}
    assert plan.drop_layers == [min(kl, key=kl.get)]


def test_iterative_reprofiles_and_matches_profile_of_dropped_model(llama_and_profile):
    model, profile = llama_and_profile
    windows = tiny_windows(4, 16)
    plan = make_plan(profile, "layer-skip", {"n_drop": 2, "iterative": True, "protect_first": 0,
                                             "protect_last": 0}, model, windows=windows, progress=False)
    first = plan.planner["rounds"][0]["dropped"][0]
    assert len(plan.drop_layers) == 2 and first == min(range(4), key=lambda i: profile.score(f"L{i}"))
    # The second choice must be the least important layer of the model without the first one.
    from mi_opt.surgery.layers import drop_layers_
    import copy

    reduced = drop_layers_(copy.deepcopy(model), [first])
    fresh = profile_ablation(reduced, windows, AblationConfig(unit_kinds=("layer",)), progress=False)
    alive = [i for i in range(4) if i != first]
    second = alive[min(range(3), key=lambda j: fresh.score(f"L{j}"))]
    assert plan.drop_layers == sorted([first, second])
    assert sum(p.numel() for p in model.parameters()) == plan.predicted["parameters_before"]  # untouched


def test_impossible_budgets_and_bad_options_raise(llama_and_profile):
    model, profile = llama_and_profile
    with pytest.raises(MiOptError, match="only 2 of 4 layers"):
        make_plan(profile, "layer-skip", {"n_drop": 3}, model)
    with pytest.raises(MiOptError, match="cannot reach"):
        make_plan(profile, "layer-skip", {"target_fraction": 0.01}, model)
    with pytest.raises(MiOptError, match="exactly one of"):
        make_plan(profile, "layer-skip", {}, model)
    with pytest.raises(MiOptError, match="unknown LayerSkipConfig option"):
        make_plan(profile, "layer-skip", {"n_dorp": 1}, model)
    with pytest.raises(MiOptError, match="Did you mean 'layer-skip'"):
        make_plan(profile, "layer_skip", {"n_drop": 1}, model)
    with pytest.raises(MiOptError, match="fingerprint"):
        make_plan(profile, "layer-skip", {"n_drop": 1}, tiny_model("llama", seed=1))
    assert "layer-skip" in PLANNERS


def test_non_causal_profile_ranks_first_round_by_its_score_when_rescoring_by_kl():
    """The drop-quarter-layers-causal recipe: block influence (no kl) ranks, exact KL re-scores."""
    from mi_opt.profile.scorers import run_scorer

    model, windows = tiny_model("llama"), tiny_windows(4, 16)
    profile = run_scorer("block_influence", model, windows, {"batch_size": 2}, progress=False)
    plan = make_plan(profile, "layer-skip", {"n_drop": 1, "iterative": True, "rescore": "ablation", "candidates": 2,
                                             "metric": "kl", "protect_first": 1, "protect_last": 1},
                     model=model, windows=windows, progress=False)
    assert len(plan.drop_layers) == 1 and plan.planner["rounds"]
    with pytest.raises(MiOptError, match="measures no kl"):  # without re-scoring, kl is nowhere to be had
        make_plan(profile, "layer-skip", {"n_drop": 1, "metric": "kl"}, model=model)
