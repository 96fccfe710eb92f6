"""Bits planner: sensitivity measured with the real bnb modules, knapsack allocation under a budget."""
from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model, tiny_windows

from mi_opt.errors import MiOptError
from mi_opt.policy import make_plan
from mi_opt.policy.bits import BitsConfig, allocate_bits, solve_mckp
from mi_opt.profile.quant_sensitivity import QuantSensitivity, measure_quant_sensitivity
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.surgery.quantize import quantize_, quantized_linear, quantized_modules


def test_knapsack_hand_checked_instance():
    costs = [[4, 8, 16], [4, 8, 16]]
    damages = [[10.0, 1.0, 0.0], [3.0, 0.5, 0.0]]
    # budget 20: (8, 8) costs 16 with damage 1.5; (16, 4) costs 20 with 3.0; nothing else is cheaper in damage.
    assert solve_mckp(costs, damages, 20) == ([1, 1], True)
    # budget 12: (8, 4) damage 4.0 beats (4, 8) damage 10.5.
    assert solve_mckp(costs, damages, 12) == ([1, 0], True)
    assert solve_mckp(costs, damages, 32)[0] == [2, 2]


def test_knapsack_matches_brute_force():
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(1, 5)
        costs = [sorted(rng.randint(1, 30) for _ in range(3)) for _ in range(n)]
        damages = [sorted((rng.random() for _ in range(3)), reverse=True) for _ in range(n)]
        budget = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
        picks, exact = solve_mckp(costs, damages, budget)
        assert sum(costs[i][j] for i, j in enumerate(picks)) <= budget
        best = min(sum(damages[i][j] for i, j in enumerate(p)) for p in itertools.product(range(3), repeat=n)
                   if sum(costs[i][j] for i, j in enumerate(p)) <= budget)
        assert sum(damages[i][j] for i, j in enumerate(picks)) == pytest.approx(best, abs=1e-12)


def test_knapsack_rounded_mode_never_exceeds_budget():
    rng = random.Random(1)
    costs = [[rng.randint(1000, 5000) * 7919 for _ in range(3)] for _ in range(12)]
    damages = [[rng.random() for _ in range(3)] for _ in range(12)]
    budget = sum(sorted(c)[1] for c in costs) + 1
    picks, exact = solve_mckp(costs, damages, budget, resolution=100)
    assert not exact
    assert sum(costs[i][j] for i, j in enumerate(picks)) <= budget


def test_knapsack_infeasible():
    with pytest.raises(MiOptError, match="cannot be met"):
        solve_mckp([[4, 8], [4, 8]], [[1, 0], [1, 0]], 7)


SIZES = {f"L{i}": {"params": 100, "bytes": {"4": 60, "8": 110, "16": 200}} for i in range(4)}
DAMAGE = {"L0": {4: 5.0, 8: 0.1}, "L1": {4: 0.2, 8: 0.01}, "L2": {4: 1.0, 8: 0.05}, "L3": {4: 0.3, 8: 0.0}}


def test_allocate_avg_bits_budget():
    bits, predicted = allocate_bits(DAMAGE, SIZES, BitsConfig(avg_bits=6, widths=(4, 8)))
    assert bits == {"L0": 8, "L1": 4, "L2": 8, "L3": 4}   # the two most damaged at 4 bits get 8
    assert predicted["avg_bits"] == 6 and predicted["exact"]
    bits, predicted = allocate_bits(DAMAGE, SIZES, BitsConfig(avg_bits=7, widths=(4, 8, 16)))
    # 28 bits over 4 equal units: 16+4+4+4 has damage 1.5, 8+4+8+8 has 0.35 (the best), 8+8+8+4 has 0.46.
    assert bits == {"L0": 8, "L1": 4, "L2": 8, "L3": 8} and predicted["avg_bits"] == 7


def test_allocate_bytes_budget():
    bits, predicted = allocate_bits(DAMAGE, SIZES, BitsConfig(max_bytes=400, widths=(4, 8, 16)))
    assert predicted["linear_bytes"] <= 400
    # 16+8+4+4 would cost 430 bytes; the best within 400 is 8,4,8,8: 390 bytes, damage 0.35.
    assert bits == {"L0": 8, "L1": 4, "L2": 8, "L3": 8} and predicted["linear_bytes"] == 390
    assert sum(SIZES[k]["bytes"][str(b)] for k, b in bits.items()) == predicted["linear_bytes"]


def test_allocate_budget_too_small():
    with pytest.raises(MiOptError, match="cannot be met"):
        allocate_bits(DAMAGE, SIZES, BitsConfig(avg_bits=3.5, widths=(4, 8)))


@pytest.mark.parametrize("options,match", [
    ({"avg_bits": 6, "widths": (2, 4)}, "widths"),
    ({}, "exactly one budget"),
    ({"avg_bits": 6, "max_bytes": 10}, "exactly one budget"),
    ({"avg_bits": 6, "granularity": "head"}, "granularity"),
    ({"avg_bits": 6, "metric": "acc"}, "metric"),
    ({"avg_bits": 6, "score": "magic"}, "score"),
    ({"avg_bits": 6, "lm_head_bits": 2}, "lm_head_bits"),
])
def test_config_errors(options, match):
    with pytest.raises(MiOptError, match=match):
        BitsConfig(**options)


def test_sensitivity_deterministic_and_model_untouched():
    model = tiny_model("llama")
    windows = tiny_windows(8, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = measure_quant_sensitivity(model, windows, batch_size=4, progress=False)
    b = measure_quant_sensitivity(model, windows, batch_size=4, progress=False)
    assert a.scores == b.scores and a.base_loss == b.base_loss
    assert quantized_modules(model) == {}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(a.scores[k]["4"]["kl"] > a.scores[k]["8"]["kl"] >= 0 for k in a.scores)


@pytest.mark.parametrize("granularity,unit,names", [
    ("layer", "L1", None),
    ("module", "L2.mlp.down_proj", ["model.layers.2.mlp.down_proj"]),
])
def test_sensitivity_equals_full_forward_with_real_modules(granularity, unit, names):
    """The cached run-from-layer engine gives the numbers of a plain forward of the quantized model."""
    model = tiny_model("llama")
    windows = tiny_windows(4, 16)
    sens = measure_quant_sensitivity(model, windows, batch_size=4, granularity=granularity, progress=False)
    with torch.inference_mode():
        clean = F.log_softmax(model(windows).logits[:, :-1].float(), -1)
        if names is None:
            names = [n for n, m in model.model.layers[1].named_modules(prefix="model.layers.1")
                     if type(m) is torch.nn.Linear]
        originals = {n: model.get_submodule(n) for n in names}
        for n in names:
            model.set_submodule(n, quantized_linear(originals[n], 4, "nf4"))
        quant = F.log_softmax(model(windows).logits[:, :-1].float(), -1)
    targets = windows[:, 1:]
    dl = (F.nll_loss(quant.transpose(1, 2), targets) - F.nll_loss(clean.transpose(1, 2), targets)).item()
    kl = F.kl_div(quant, clean, log_target=True, reduction="none").sum(-1).mean().item()
    assert sens.scores[unit]["4"]["delta_loss"] == pytest.approx(dl, abs=1e-5)
    assert sens.scores[unit]["4"]["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6)  # KL as a difference of fp32 sums


def test_sensitivity_json_round_trip(tmp_path):
    sens = measure_quant_sensitivity(tiny_model("llama"), tiny_windows(4, 16), granularity="module", progress=False)
    path = sens.save(tmp_path / "sens.json")
    again = QuantSensitivity.load(path)
    assert again.to_dict() == sens.to_dict()
    assert again.to_dict()["schema"] == "mi-opt/quant-sensitivity"
    assert len(again.units()) == 4 * 7


@pytest.fixture(scope="module")
def planned():
    model = tiny_model("llama")
    windows = tiny_windows(8, 16)
    profile = profile_ablation(model, windows, AblationConfig(unit_kinds=("layer",)), progress=False)
    return model, windows, profile


def test_planner_gives_8_bits_where_4_bits_hurt_most(planned):
    model, windows, profile = planned
    plan = make_plan(profile, "bits", {"avg_bits": 5, "widths": (4, 8), "granularity": "layer"}, model, windows,
                     progress=False)
    sens = measure_quant_sensitivity(model, windows, granularity="layer", progress=False)
    gain = {k: v["4"]["kl"] - v["8"]["kl"] for k, v in sens.scores.items()}
    # equal-size layers, 5 avg bits from {4, 8}: exactly one layer gets 8 bits, the one 4 bits hurts most
    assert {k for k, b in plan.bits.items() if b == 8} == {max(gain, key=gain.get)}
    assert plan.bits["embed"] == 16 and plan.bits["lm_head"] == 16
    assert plan.predicted["avg_bits"] == 5
    assert plan.planner["name"] == "bits" and plan.budget["avg_bits"] == 5


def test_planner_plan_applies_and_matches_predicted_bits(planned):
    model, windows, profile = planned
    plan = make_plan(profile, "bits", {"avg_bits": 8, "granularity": "module"}, model, windows, progress=False)
    work = tiny_model("llama")
    applied = quantize_(work, plan.bits, plan.quant_type)
    weights = {n: work.get_submodule(n).in_features * work.get_submodule(n).out_features for n in applied}
    linear_total = sum(m.weight.numel() for n, m in tiny_model("llama").named_modules()
                       if type(m) is torch.nn.Linear and n.startswith("model.layers."))
    quantized_bits = sum(weights[n] * b for n, b in applied.items())
    unquantized = linear_total - sum(weights.values())
    assert (quantized_bits + 16 * unquantized) / linear_total == pytest.approx(plan.predicted["avg_bits"], abs=1e-3)
    assert plan.predicted["avg_bits"] <= 8


def test_planner_from_saved_sensitivity_matches(planned, tmp_path):
    model, windows, profile = planned
    sens = measure_quant_sensitivity(model, windows, progress=False)
    path = sens.save(tmp_path / "s.json")
    a = make_plan(profile, "bits", {"avg_bits": 6, "widths": (4, 8, 16)}, model, windows, progress=False)
    b = make_plan(profile, "bits", {"avg_bits": 6, "widths": (4, 8, 16), "sensitivity": str(path)}, model,
                  progress=False)
    assert a.bits == b.bits


def test_int8_threshold_flows_from_config_to_sensitivity_plan_and_surgery(planned, tmp_path):
    import bitsandbytes as bnb

    from mi_opt.surgery import apply_

    model, windows, profile = planned
    sens = measure_quant_sensitivity(model, windows, int8_threshold=0.0, progress=False)
    assert sens.method["int8_threshold"] == 0.0
    path = sens.save(tmp_path / "pure-int8.json")
    plan = make_plan(profile, "bits", {"avg_bits": 6, "widths": (4, 8), "sensitivity": str(path),
                                       "int8_threshold": 0.0}, model, progress=False)
    assert plan.int8_threshold == 0.0
    work = apply_(tiny_model("llama"), plan)
    assert {m.state.threshold for m in work.modules() if isinstance(m, bnb.nn.Linear8bitLt)} == {0.0}
    with pytest.raises(MiOptError, match="same int8_threshold"):   # measured at 0.0, asked for 6.0
        make_plan(profile, "bits", {"avg_bits": 6, "widths": (4, 8), "sensitivity": str(path)}, model,
                  progress=False)
    with pytest.raises(MiOptError, match="int8_threshold must be a number >= 0"):
        BitsConfig(avg_bits=6, int8_threshold=-2)


def test_planner_importance_mode_and_errors(planned):
    model, windows, profile = planned
    plan = make_plan(profile, "bits", {"avg_bits": 6, "widths": (4, 8), "score": "importance"}, model, progress=False)
    ranked = sorted(range(4), key=lambda i: -profile.score(f"L{i}", "kl"))
    assert {k for k, b in plan.bits.items() if b == 8 and k.startswith("L")} == {f"L{i}" for i in ranked[:2]}
    with pytest.raises(MiOptError, match="windows"):
        make_plan(profile, "bits", {"avg_bits": 6}, model, progress=False)
    with pytest.raises(MiOptError, match="cannot be met"):
        make_plan(profile, "bits", {"avg_bits": 3, "score": "importance"}, model, progress=False)


def test_tied_lm_head_rule():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, tie_word_embeddings=True)).eval()
    windows = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    profile = profile_ablation(model, windows, AblationConfig(unit_kinds=("layer",)), progress=False)
    with pytest.raises(MiOptError, match="ties lm_head"):
        make_plan(profile, "bits", {"avg_bits": 6, "lm_head_bits": 8}, model, windows, progress=False)
