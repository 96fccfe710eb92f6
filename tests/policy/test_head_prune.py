"""Head-prune planner: uniform plans load with plain transformers, free plans hit exact counts."""
from __future__ import annotations

import itertools

import pytest
from tiny import tiny_model, tiny_windows

from mi_opt.arch import HeadGeometry
from mi_opt.errors import MiOptError
from mi_opt.policy import make_plan
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.surgery import apply_
from mi_opt.surgery.heads import head_layout


def _profile(family: str):
    model = tiny_model(family)
    return model, profile_ablation(model, tiny_windows(4, 16), AblationConfig(unit_kinds=("layer", "head")),
                                   progress=False)


@pytest.fixture(scope="module")
def llama():
    return _profile("llama")


def _best_regular(scores: list[float], n_kv: int) -> dict[int, float]:
    """Brute force: least summed score per number of removed heads, over layouts without K/V copies."""
    geo = HeadGeometry(n_heads=len(scores), n_kv_heads=n_kv, head_dim=1)
    best: dict[int, float] = {}
    for r in range(len(scores)):
        for pruned in itertools.combinations(range(len(scores)), r):
            lay = head_layout(geo, pruned)
            if len(set(lay.kv_sources)) == lay.n_kv_heads:
                best[r] = min(best.get(r, float("inf")), sum(scores[h] for h in pruned))
    return best


def _removed_score(profile, plan) -> float:
    return sum(profile.score(f"L{i}.H{h}") for i, heads in plan.prune_heads.items() for h in heads)


def test_uniform_prunes_every_layer_alike_at_least_summed_score(llama):
    model, profile = llama
    plan = make_plan(profile, "head-prune", {"fraction": 0.5, "mode": "uniform"}, model)
    assert plan.head_mode == "uniform" and sorted(plan.prune_heads) == [0, 1, 2, 3]
    assert all(len(h) == 2 for h in plan.prune_heads.values())
    # 2 KV groups of 2 heads: keep one head per group, or keep one whole group, the same in every layer.
    s = [[profile.score(f"L{i}.H{h}") for h in range(4)] for i in range(4)]
    one_per_group = sum(min(r[0:2]) + min(r[2:4]) for r in s)
    one_group = sum(min(sum(r[0:2]), sum(r[2:4])) for r in s)
    assert _removed_score(profile, plan) == pytest.approx(min(one_per_group, one_group))
    compressed = apply_(tiny_model("llama"), plan)
    assert compressed.config.num_attention_heads == 2
    assert sum(p.numel() for p in compressed.parameters()) == plan.predicted["parameters"]


def test_uniform_rejects_counts_the_grouping_cannot_express(llama):
    model, profile = llama
    with pytest.raises(MiOptError, match="heads removable per layer: \\[0, 2, 3\\]"):
        make_plan(profile, "head-prune", {"fraction": 0.25, "mode": "uniform"}, model)
    with pytest.raises(MiOptError, match="multiple of 4"):
        make_plan(profile, "head-prune", {"n_heads": 5, "mode": "uniform"}, model)


def test_free_mode_finds_the_cheapest_exact_count(llama):
    model, profile = llama
    plan = make_plan(profile, "head-prune", {"n_heads": 5, "mode": "free"}, model)
    assert sum(len(h) for h in plan.prune_heads.values()) == 5
    per_layer = [_best_regular([profile.score(f"L{i}.H{h}") for h in range(4)], 2) for i in range(4)]
    best = min(sum(per_layer[i][c[i]] for i in range(4))
               for c in itertools.product(*[list(p) for p in per_layer]) if sum(c) == 5)
    assert _removed_score(profile, plan) == pytest.approx(best)
    compressed = apply_(tiny_model("llama"), plan)
    assert sum(p.numel() for p in compressed.parameters()) == plan.predicted["parameters"]


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma3"])
def test_free_plans_apply_with_predicted_parameter_count(family):
    model, profile = _profile(family)
    plan = make_plan(profile, "head-prune", {"fraction": 0.5, "mode": "free", "protect_layers": [0]}, model)
    assert 0 not in plan.prune_heads and sum(len(h) for h in plan.prune_heads.values()) == 6
    compressed = apply_(tiny_model(family), plan)
    assert sum(p.numel() for p in compressed.parameters()) == plan.predicted["parameters"]


def test_combined_drops_layers_then_prunes_the_rest(llama):
    model, profile = llama
    plan = make_plan(profile, "combined", {"layer_skip": {"n_drop": 1},
                                           "head_prune": {"fraction": 0.5, "mode": "uniform"}}, model)
    assert len(plan.drop_layers) == 1
    assert sorted(plan.prune_heads) == sorted(set(range(4)) - set(plan.drop_layers))
    compressed = apply_(tiny_model("llama"), plan)
    assert compressed.config.num_hidden_layers == 3 and compressed.config.num_attention_heads == 2
    assert sum(p.numel() for p in compressed.parameters()) == plan.predicted["parameters"]


def test_bad_head_budgets_raise(llama):
    model, profile = llama
    with pytest.raises(MiOptError, match="every layer keeps at least one head"):
        make_plan(profile, "head-prune", {"n_heads": 13, "mode": "free"}, model)
    with pytest.raises(MiOptError, match="exactly one of"):
        make_plan(profile, "head-prune", {"mode": "free"}, model)
    layers_only = profile_ablation(model, tiny_windows(4, 16), AblationConfig(unit_kinds=("layer",)), progress=False)
    with pytest.raises(MiOptError, match="no head scores"):
        make_plan(layers_only, "head-prune", {"fraction": 0.5}, model)


def test_measured_kv_group_scores_decide_whole_group_removal():
    from mi_opt.policy.head_prune import _layer_options

    heads = [1.0, 1.0, 0.1, 0.1]  # 2 KV groups of 2; group 1's heads look unimportant one by one
    summed = _layer_options(heads, 2)
    # Without group scores, removing group 1 whole costs 0.2: the cheapest way to keep 2 heads.
    assert min(summed.values(), key=lambda o: o.removed_score if o.keep_per_group * o.keep_groups == 2
               else float("inf")).pruned == (2, 3)
    # Ablated together, group 1 turns out vital (redundant heads): now one head per group goes.
    measured = _layer_options(heads, 2, group_scores=[2.5, 5.0])
    best = min((o for o in measured.values() if o.keep_per_group * o.keep_groups == 2),
               key=lambda o: o.removed_score)
    assert best.keep_groups == 2 and best.removed_score == pytest.approx(1.1)


def test_planner_reads_kv_group_units_from_the_profile():
    model = tiny_model("llama")
    profile = profile_ablation(model, tiny_windows(4, 16), AblationConfig(unit_kinds=("head", "kv_group")),
                               progress=False)
    plan = make_plan(profile, "head-prune", {"fraction": 0.5, "mode": "uniform"}, model=model)
    assert sum(len(v) for v in plan.prune_heads.values()) == 8


def test_pruning_in_rounds_rescores_the_pruned_model():
    import copy

    from tiny import tiny_windows

    from mi_opt.profile.ablation import AblationConfig, profile_ablation
    from mi_opt.surgery.heads import prune_heads_

    model, windows = tiny_model("llama"), tiny_windows(4, 16)
    profile = profile_ablation(model, windows, AblationConfig(unit_kinds=("head",)), progress=False)
    plan = make_plan(profile, "head-prune", {"fraction": 0.5, "mode": "free", "rounds": 2}, model,
                     windows=windows, progress=False)
    first, second = plan.planner["rounds"]
    n_total = sum(len(v) for v in plan.prune_heads.values())
    assert first["n_heads"] == round(n_total / 2) and second["n_heads"] == n_total
    # Round 1's heads are pruned again (they score -1e9 in round 2) ...
    assert all(set(v) <= set(plan.prune_heads.get(int(k), [])) for k, v in first["pruned"].items())
    # ... and round 2 chose by the scores of the model pruned in round 1.
    work = copy.deepcopy(model)
    prune_heads_(work, {int(k): v for k, v in first["pruned"].items()}, mode="free")
    fresh = profile_ablation(work, windows, AblationConfig(unit_kinds=("head",)), progress=False)
    one_shot = make_plan(profile, "head-prune", {"fraction": 0.5, "mode": "free"}, model)
    assert first["cost"]["n_units"] == len(fresh.units("head"))
    assert apply_(tiny_model("llama"), plan) is not None and one_shot.prune_heads  # both apply
    with pytest.raises(MiOptError, match="needs calibration windows"):
        make_plan(profile, "head-prune", {"fraction": 0.5, "mode": "free", "rounds": 2}, model)
    with pytest.raises(MiOptError, match="rounds must be >= 1"):
        make_plan(profile, "head-prune", {"fraction": 0.5, "rounds": 0}, model)


@pytest.mark.parametrize("drop,prune,message", [
    ([0, 1, 2, 3], {}, "would drop all 4 layers"),
    ([], {1: [0, 1, 2, 3]}, "would remove all 4 heads of layer 1"),
])
def test_a_plan_that_leaves_no_model_is_refused(drop, prune, message):
    from mi_opt.plan import CompressionPlan
    from mi_opt.policy import check_leaves_a_model
    from mi_opt.policy.cost import ModelCost

    cost = ModelCost.from_model(tiny_model())
    with pytest.raises(MiOptError, match=message):
        check_leaves_a_model(CompressionPlan(model={}, drop_layers=drop, prune_heads=prune), cost)
    check_leaves_a_model(CompressionPlan(model={}, drop_layers=[0, 1, 2], prune_heads={3: [0, 1, 2]}), cost)
