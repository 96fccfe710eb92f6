"""Width-prune planner on a tiny Llama (MLP width 64, groups of 24: 0-23, 24-47 and a smaller 48-63).

Profiles are built by hand: the planner only reads scores, so seeded numbers test it exactly.
"""
from __future__ import annotations

import math

import pytest
from hand_profiles import hand_profile
from tiny import tiny_model

from mi_opt.errors import MiOptError
from mi_opt.policy import make_plan
from mi_opt.policy.cost import ModelCost
from mi_opt.profile.importance import UnitScore
from mi_opt.surgery import apply_
from mi_opt.units import parse_unit


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def applied_params(plan) -> tuple[int, object]:
    pruned = apply_(tiny_model("llama"), plan)
    return sum(p.numel() for p in pruned.parameters()), pruned


def removed(plan) -> int:
    return plan.predicted["parameters_before"] - plan.predicted["parameters"]


def test_uniform_meets_the_budget_with_one_mlp_size_as_predicted(model):
    cost = ModelCost.from_model(model)
    plan = make_plan(hand_profile(), "width-prune", {"fraction": 0.2}, model)
    target = math.ceil(0.2 * cost.decoder_params)
    assert plan.budget["remove_params"] == target and removed(plan) >= target
    assert plan.neuron_mode == "uniform" and len(set(plan.predicted["mlp_sizes"])) == 1
    assert sorted(plan.prune_neurons) == [0, 1, 2, 3]
    # The smallest uniform removal that meets it: 16 neurons per layer (the small last group) would not.
    assert 16 * 4 * cost.per_neuron[0] < target
    count, pruned = applied_params(plan)
    assert count == plan.predicted["parameters"]
    assert pruned.config.intermediate_size == plan.predicted["mlp_sizes"][0]
    assert {layer.mlp.down_proj.in_features for layer in pruned.model.layers} == {pruned.config.intermediate_size}
    assert plan.planner["scorer"] == "activation"


def test_uniform_removes_each_layers_lowest_groups_and_knows_the_last_is_smaller(model):
    profile = hand_profile()
    per_neuron = ModelCost.from_model(model).per_neuron[0]
    # 16 neurons per layer: only the last group (48-63) has that size, whatever its score.
    plan = make_plan(profile, "width-prune", {"n_params": 16 * 4 * per_neuron}, model)
    assert plan.prune_neurons == {i: list(range(48, 64)) for i in range(4)}
    # 24 per layer: the lower-scored of the two full-size groups of each layer.
    plan = make_plan(profile, "width-prune", {"n_params": 24 * 4 * per_neuron}, model)
    for i in range(4):
        low = min(("N0-23", "N24-47"), key=lambda g: profile.score(f"L{i}.mlp.{g}"))
        assert plan.prune_neurons[i] == list(parse_unit(f"L{i}.mlp.{low}").neurons)
    assert applied_params(plan)[0] == plan.predicted["parameters"]


def test_free_takes_the_least_score_per_parameter_across_layers(model):
    profile = hand_profile(seed=3)
    cost = ModelCost.from_model(model)
    plan = make_plan(profile, "width-prune", {"fraction": 0.2, "mode": "free"}, model)
    target = math.ceil(0.2 * cost.decoder_params)
    # Expected: groups by score / parameters saved, taken until the target is met, no MLP emptied.
    order = sorted(profile.units("neurons"),
                   key=lambda k: profile.score(k) / (len(parse_unit(k).neurons) * cost.per_neuron[0]))
    taken, saved, left = set(), 0, {i: 63 for i in range(4)}
    for key in order:
        unit = parse_unit(key)
        if saved >= target:
            break
        if len(unit.neurons) <= left[unit.layer]:
            taken.add(key)
            left[unit.layer] -= len(unit.neurons)
            saved += len(unit.neurons) * cost.per_neuron[0]
    chosen = {f"L{i}.mlp.N{g.start}-{g.stop - 1}" for i, ns in plan.prune_neurons.items()
              for g in _runs(ns, profile, i)}
    assert chosen == taken and removed(plan) == saved >= target
    assert plan.neuron_mode == "free" and applied_params(plan)[0] == plan.predicted["parameters"]


def _runs(neurons: list[int], profile, layer: int) -> list[range]:
    """The profile's groups of `layer` that `neurons` consists of."""
    groups = [parse_unit(k).neurons for k in profile.units("neurons") if parse_unit(k).layer == layer]
    chosen = [g for g in groups if set(g) <= set(neurons)]
    assert sorted(n for g in chosen for n in g) == neurons
    return chosen


def test_never_an_empty_mlp_and_min_keep_and_protect_layers_hold(model):
    profile = hand_profile()
    for key in profile.units("neurons"):  # layer 0's groups are by far the cheapest
        if parse_unit(key).layer == 0:
            profile.scores[key] = UnitScore(-1.0, 0, 0.0, 0)
    plan = make_plan(profile, "width-prune", {"fraction": 0.4, "mode": "free"}, model)
    assert 0 < len(plan.prune_neurons[0]) < 64
    assert all(len(n) < 64 for n in plan.prune_neurons.values())
    plan = make_plan(profile, "width-prune", {"fraction": 0.15, "mode": "free", "min_keep": 0.5}, model)
    assert all(64 - len(n) >= 32 for n in plan.prune_neurons.values())
    plan = make_plan(profile, "width-prune", {"fraction": 0.2, "mode": "free", "protect_layers": [0, 2]}, model)
    assert set(plan.prune_neurons) <= {1, 3} and plan.prune_neurons
    assert applied_params(plan)[0] == plan.predicted["parameters"]
    with pytest.raises(MiOptError, match="cannot remove 11,136 parameters: .* at most 9,216"):
        make_plan(profile, "width-prune", {"fraction": 0.3, "mode": "free", "min_keep": 0.5}, model)


@pytest.mark.parametrize("mode", ["uniform", "free"])
def test_cheap_heads_take_the_budget_when_allowed(model, mode):
    profile = hand_profile(heads=0.0)  # heads cost nothing: they go first
    plan = make_plan(profile, "width-prune", {"fraction": 0.1, "mode": mode, "heads": True}, model)
    assert plan.prune_heads and plan.planner["heads_removed"] > 0
    assert removed(plan) >= plan.budget["remove_params"]
    count, pruned = applied_params(plan)
    assert count == plan.predicted["parameters"]
    if mode == "uniform":
        assert len({len(h) for h in plan.prune_heads.values()}) == 1 and len(plan.prune_heads) == 4
        assert pruned.config.num_attention_heads == 4 - len(plan.prune_heads[0])
    # Costly heads are left alone; a share caps how many may go.
    assert not make_plan(hand_profile(heads=100.0), "width-prune",
                         {"fraction": 0.1, "mode": mode, "heads": True}, model).prune_heads
    capped = make_plan(profile, "width-prune", {"fraction": 0.1, "mode": "free", "heads": 0.25}, model)
    assert sum(len(h) for h in capped.prune_heads.values()) <= 4


@pytest.mark.parametrize("config, message", [
    ({"fraction": 0.2, "n_params": 100}, "exactly one budget"),
    ({}, "exactly one budget"),
    ({"fraction": 1.5}, "fraction .* must be in \\(0, 1\\)"),
    ({"fraction": 0.0}, "fraction .* must be in \\(0, 1\\)"),
    ({"bytes": -4}, "bytes .* must be > 0"),
    ({"fraction": "a fifth"}, "option 'fraction' must be a number"),
    ({"fraction": 0.2, "mode": "ragged"}, "mode must be one of"),
    ({"fraction": 0.2, "protect_layers": [1]}, "protect_layers needs mode 'free'"),
    ({"fraction": 0.2, "min_keep": 1.0}, "min_keep"),
    ({"fraction": 0.2, "heads": 2.0}, "heads must be"),
    ({"fraction": 0.2, "metric": "bleu"}, "metric must be one of"),
])
def test_bad_configs_are_one_clear_error(model, config, message):
    with pytest.raises(MiOptError, match=message):
        make_plan(hand_profile(), "width-prune", config, model)


def test_profiles_without_usable_neuron_scores_say_how_to_profile(model):
    with pytest.raises(MiOptError, match="no MLP neuron-group scores.*unit_kinds including 'neurons'"):
        make_plan(hand_profile(neurons=False), "width-prune", {"fraction": 0.2}, model)
    with pytest.raises(MiOptError, match="has no kl score .*activation.*metric: delta_loss"):
        make_plan(hand_profile(kl=False), "width-prune", {"fraction": 0.2, "metric": "kl"}, model)
    partial = hand_profile()
    for key in [k for k in partial.scores if k.startswith("L2.mlp")]:
        del partial.scores[key]
    with pytest.raises(MiOptError, match="no neuron-group scores for layer\\(s\\) \\[2\\]"):
        make_plan(partial, "width-prune", {"fraction": 0.2}, model)


def test_bytes_budget_counts_at_the_models_dtype(model):
    cost = ModelCost.from_model(model)
    plan = make_plan(hand_profile(), "width-prune", {"bytes": 40_000, "mode": "free"}, model)
    assert plan.budget["remove_params"] == math.ceil(40_000 / cost.bytes_per_param)
    assert plan.predicted["bytes_before"] - plan.predicted["bytes"] >= 40_000


def test_recipes_accept_the_width_planners_and_name_bad_options():
    from mi_opt.recipe import recipe_from_dict

    for planner, options in [("width-prune", {"fraction": 0.2, "mode": "uniform"}),
                             ("joint-prune", {"fraction": 0.2, "step": 0.5, "select": "loss"})]:
        recipe = recipe_from_dict({"name": "w", "policy": {"planner": planner, "options": options}})
        assert recipe.policy.planner == planner
    with pytest.raises(MiOptError, match="policy.options: .*exactly one budget"):
        recipe_from_dict({"name": "w", "policy": {"planner": "width-prune", "options": {"fraction": 0.2, "bytes": 9}}})
    with pytest.raises(MiOptError, match="policy.options: .*'heads' must be true or false or a number"):
        recipe_from_dict({"name": "w", "policy": {"planner": "width-prune", "options": {"fraction": 0.2,
                                                                                         "heads": "yes"}}})


def test_free_mode_puts_non_causal_scores_of_each_layer_on_one_scale(model):
    profile = hand_profile(kl=False)  # a statistic, not measured damage: no kl
    for key in profile.units("neurons"):
        if parse_unit(key).layer == 0:  # layer 0's statistic runs 1000x larger, its ranking is the same
            profile.scores[key] = UnitScore(profile.score(key) * 1000, 0, None, 0)
    raw = make_plan(profile, "width-prune", {"fraction": 0.2, "mode": "free", "normalize": "none"}, model)
    assert 0 not in raw.prune_neurons and not raw.planner["normalized"]
    auto = make_plan(profile, "width-prune", {"fraction": 0.2, "mode": "free"}, model)
    assert auto.planner["normalized"] and not auto.planner["causal_scores"]
    assert auto.prune_neurons == make_plan(hand_profile(kl=False), "width-prune",
                                           {"fraction": 0.2, "mode": "free", "normalize": "layer"}, model).prune_neurons
    with pytest.raises(MiOptError, match="heads compete .* \\(no kl\\)"):
        make_plan(profile, "width-prune", {"fraction": 0.2, "heads": True}, model)
    # Causal scores are compared as they are.
    assert not make_plan(hand_profile(), "width-prune", {"fraction": 0.2, "mode": "free"}, model).planner["normalized"]
