"""The cost model predicts exactly the forward-pass work the engines report."""
from __future__ import annotations

import pytest
from tiny import tiny_model, tiny_windows

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.profile.cost import ModelShape, estimate
from mi_opt.units import enumerate_units


@pytest.mark.parametrize("kinds,budget", [(("layer", "attn", "mlp"), None), (("head",), None),
                                          (("layer", "head"), 0.004)])
def test_predicted_forward_equivalents_match_the_fast_engine(kinds, budget):
    model = tiny_model("llama")
    profile = profile_ablation(model, tiny_windows(8, 16), AblationConfig(unit_kinds=kinds, cache_budget_mb=budget),
                               progress=False)
    layers = [u.layer for u in enumerate_units(get_adapter(model), kinds)]
    est = estimate(ModelShape.of(model), layers, n_samples=8, seq_len=16, batch_size=4,
                   cache_stride=profile.cost["cache_stride"])
    assert est.full_forward_equivalents == pytest.approx(profile.cost["full_forward_equivalents"])


def test_naive_counts_one_forward_per_unit_and_batch():
    model = tiny_model("llama")
    profile = profile_ablation(model, tiny_windows(8, 16), AblationConfig(unit_kinds=("layer",), engine="naive"),
                               progress=False)
    est = estimate(ModelShape.of(model), [0, 1, 2, 3], n_samples=8, seq_len=16, batch_size=4, engine="naive")
    assert est.full_forward_equivalents == profile.cost["full_forwards"]


def test_fast_is_cheaper_than_naive_and_cost_grows_with_data_and_gpus_divide_it():
    shape = ModelShape(n_layers=32, d_model=4096, vocab=128256, layer_params=218_000_000)
    layers = [layer for layer in range(32) for _ in range(32)]        # 32 heads per layer
    fast = estimate(shape, layers, n_samples=64, seq_len=512)
    assert fast.flops < estimate(shape, layers, n_samples=64, seq_len=512, engine="naive").flops
    assert estimate(shape, layers, n_samples=128, seq_len=512).flops == pytest.approx(2 * fast.flops)
    assert estimate(shape, layers, n_samples=64, seq_len=512, n_gpus=8).wall_hours == pytest.approx(fast.gpu_hours / 8)


def test_bad_arguments_are_user_errors():
    shape = ModelShape(n_layers=2, d_model=8, vocab=16, layer_params=100)
    with pytest.raises(MiOptError, match="engine"):
        estimate(shape, [0], 4, 8, engine="fastest")
    with pytest.raises(MiOptError, match="n_gpus"):
        estimate(shape, [0], 4, 8, n_gpus=0)


def test_measured_forward_equivalents_compares_scorers_on_one_scale():
    from mi_opt.profile.cost import measured_forward_equivalents

    assert measured_forward_equivalents({"full_forward_equivalents": 16.5}) == 16.5
    assert measured_forward_equivalents({"full_forward_equivalents": 16.5, "mean_pass_forwards": 2}) == 18.5
    assert measured_forward_equivalents({"forwards": 2, "backwards": 4}) == 10.0   # attribution: 2 + 2 x 4
    assert measured_forward_equivalents({"forwards": 2, "backwards": 0}) == 2.0    # block influence
    assert measured_forward_equivalents({"wall_time_s": 0.0}) == 0.0               # data-free scorers
