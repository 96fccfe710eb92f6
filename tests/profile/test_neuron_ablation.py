"""Exact causal ablation of MLP neuron groups: the interventions, both engines, and the surgery they stand for."""
import copy

import pytest
import torch
from tiny import FAMILIES, tiny_model, tiny_windows

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.hooks import attached
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.profile.interventions import ablation_hooks
from mi_opt.units import parse_unit


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_ablating_a_neuron_group_equals_slicing_it_out(family):
    model, ids = tiny_model(family), tiny_windows(2, 12)
    adapter = get_adapter(model)
    width = adapter.mlp_width(1)
    unit = parse_unit("L1.mlp.N8-23")
    with torch.no_grad(), attached(ablation_hooks(adapter, unit, "zero", None)):
        ablated = model(ids).logits
    sliced = copy.deepcopy(model)
    keep = torch.tensor([j for j in range(width) if j not in unit.neurons])
    get_adapter(sliced).slice_mlp_(1, keep)
    with torch.no_grad():
        pruned = sliced(ids).logits
        clean = model(ids).logits
    assert get_adapter(sliced).mlp_width(1) == width - 16
    assert torch.equal(ablated, pruned)   # the same sums in the same order: bit-identical
    assert not torch.allclose(ablated, clean, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_fast_engine_equals_naive_for_neuron_groups(family, ablation):
    model, windows = tiny_model(family), tiny_windows(8, 16)
    options = dict(ablation=ablation, unit_kinds=("neurons",), neuron_group=16)
    naive = profile_ablation(model, windows, AblationConfig(engine="naive", **options), progress=False)
    fast = profile_ablation(model, windows, AblationConfig(engine="fast", ablations_per_forward=3,
                                                           logit_chunk_tokens=20, **options), progress=False)
    width = get_adapter(model).mlp_width(0)
    assert len(fast.scores) == 4 * (width // 16) and fast.scores.keys() == naive.scores.keys()
    for key, s in naive.scores.items():
        assert fast.scores[key].delta_loss == pytest.approx(s.delta_loss, abs=2e-5), key
        assert fast.scores[key].kl == pytest.approx(s.kl, abs=2e-5), key
    assert max(v.kl for v in fast.scores.values()) > 1e-4
    assert fast.method["neuron_group"] == 16


def test_mean_ablation_replaces_the_group_by_its_calibration_mean():
    from mi_opt.hooks import Hook
    from mi_opt.profile.engine import calibration_batches, collect_means

    model, windows = tiny_model("qwen2"), tiny_windows(4, 12)
    adapter = get_adapter(model)
    means = collect_means(model, adapter, calibration_batches(windows, 2, torch.device("cpu")))
    proj = adapter.mlp_output_projection(adapter.layers()[2])
    seen = {}
    unit = parse_unit("L2.mlp.N4-7")
    hooks = ablation_hooks(adapter, unit, "mean", means) + [
        Hook(proj, lambda m, a: seen.update(x=a[0]), kind="forward_pre")]  # runs after the ablation
    with torch.no_grad(), attached(hooks):
        model(windows[:2])
    mean = means.get("neurons", 2)
    assert mean.shape == (adapter.mlp_width(2),)
    assert torch.equal(seen["x"][..., 4:8], mean[4:8].expand_as(seen["x"][..., 4:8]))
    assert not torch.allclose(seen["x"][..., 8:], mean[8:].expand_as(seen["x"][..., 8:]))


def test_bad_neuron_groups_are_clear_errors():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    with pytest.raises(MiOptError, match="neurons 0..63"):
        ablation_hooks(adapter, parse_unit("L0.mlp.N60-70"), "zero", None)
    with pytest.raises(MiOptError, match="last before first"):
        parse_unit("L0.mlp.N9-3")
    with pytest.raises(MiOptError, match="neuron_group must be >= 1"):
        AblationConfig(neuron_group=0)
    with pytest.raises(MiOptError, match="not among"):
        profile_ablation(model, tiny_windows(2, 8), AblationConfig(unit_kinds=("neurons",), neuron_group=16),
                         units=["L0.mlp.N0-7"], progress=False)
