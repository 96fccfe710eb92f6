"""The cheap MLP-neuron scorers (activation, wanda) and neuron-group attribution, on tiny models."""
import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILIES, tiny_model, tiny_windows

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.hooks import Hook, attached
from mi_opt.profile.attribution import AttributionConfig, profile_attribution
from mi_opt.profile.engine import collect_means
from mi_opt.profile.interventions import ablation_hooks
from mi_opt.profile.scorers import SCORERS, run_scorer
from mi_opt.units import parse_unit


def _activations(model, ids):
    """Every layer's neuron activations (the MLP output projection's input) and MLP inputs, by hand."""
    adapter = get_adapter(model)
    acts, inputs = {}, {}
    hooks = []
    for i, layer in enumerate(adapter.layers()):
        hooks.append(Hook(adapter.mlp_output_projection(layer), lambda m, a, i=i: acts.setdefault(i, a[0]),
                          kind="forward_pre"))
        hooks.append(Hook(adapter.mlp(layer), lambda m, a, i=i: inputs.setdefault(i, a[0]), kind="forward_pre"))
    with torch.no_grad(), attached(hooks):
        model(ids)
    flat = lambda t: t.reshape(-1, t.shape[-1]).double()  # noqa: E731
    return {i: flat(a) for i, a in acts.items()}, {i: flat(h) for i, h in inputs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_is_the_groups_mean_absolute_activation(family):
    model, ids = tiny_model(family), tiny_windows(8, 16)
    profile = run_scorer("activation", model, ids, {"neuron_group": 16, "batch_size": 4}, progress=False)
    acts, _ = _activations(model, ids)
    adapter = get_adapter(model)
    assert len(profile.scores) == sum(-(-adapter.mlp_width(i) // 16) for i in range(adapter.n_layers()))
    for key in profile.units("neurons"):
        u = parse_unit(key)
        expected = acts[u.layer][:, u.index:u.stop].abs().mean(0).sum().item()
        assert profile.score(key) == pytest.approx(expected, rel=1e-6), key
        assert profile.scores[key].kl is None and profile.scores[key].delta_loss_se is not None
    assert profile.cost["forwards"] == 2 and profile.cost["backwards"] == 0
    assert profile.base_loss is None and profile.method["scorer"] == "activation"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("input_rows", [False, True])
def test_wanda_is_activation_norm_times_summed_weights(family, input_rows):
    model, ids = tiny_model(family), tiny_windows(8, 16)
    profile = run_scorer("wanda", model, ids, {"neuron_group": 8, "input_rows": input_rows}, progress=False)
    acts, inputs = _activations(model, ids)
    adapter = get_adapter(model)
    for key in profile.units("neurons"):
        u = parse_unit(key)
        layer = adapter.layers()[u.layer]
        w_out = adapter.as_linear(adapter.mlp_output_projection(layer)).weight.double()  # [hidden, width]
        rms = acts[u.layer].square().mean(0).sqrt()
        per_neuron = rms * w_out.abs().sum(0)
        if input_rows:
            h_rms = inputs[u.layer].square().mean(0).sqrt()
            for proj in adapter.mlp_input_projections(layer):
                per_neuron = per_neuron + adapter.as_linear(proj).weight.double().abs() @ h_rms
        assert profile.score(key) == pytest.approx(per_neuron[u.index:u.stop].sum().item(), rel=1e-6), key


def test_cheap_scorers_are_registered_and_reject_other_units():
    for name in ("activation", "wanda"):
        scorer = SCORERS.get(name)
        assert scorer.needs_data and not scorer.causal
        with pytest.raises(MiOptError, match="neuron groups only"):
            scorer.make_config({"unit_kinds": ["head"]})
        with pytest.raises(MiOptError, match="neuron_group must be >= 1|must be >= 1"):
            scorer.make_config({"neuron_group": 0})
        with pytest.raises(MiOptError, match="needs calibration windows"):
            scorer(tiny_model("llama"), None)


# --- attribution of neuron groups against exact mean-ablation ------------------------------
EPS = 1e-3
LAYER = 1


def _exact_delta_loss(model, ids, key, ablation, means):
    adapter = get_adapter(model)

    def loss():
        logp = F.log_softmax(model(ids, use_cache=False).logits[:, :-1], dim=-1)
        return -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).mean()
    with torch.no_grad():
        clean = loss()
        with attached(ablation_hooks(adapter, parse_unit(key), ablation, means)):
            return (loss() - clean).item()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_neuron_attribution_matches_exact_ablation_where_the_effect_is_linear(family, ablation):
    """The output projection of one layer scaled by EPS: each group adds O(EPS) to the residual
    stream, so exact ablation is its first-order term + O(EPS^2): sign and size must match."""
    model, ids = tiny_model(family).double(), tiny_windows(8, 16)
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.mlp_output_projection(adapter.layers()[LAYER]).weight.mul_(EPS)
    profile = profile_attribution(model, ids, AttributionConfig(ablation=ablation, unit_kinds=("neurons",),
                                                                neuron_group=16, batch_size=8), progress=False)
    means = collect_means(model, adapter, [ids]) if ablation == "mean" else None
    keys = [k for k in profile.units("neurons") if parse_unit(k).layer == LAYER]
    assert len(keys) == adapter.mlp_width(LAYER) // 16
    for key in keys:
        exact = _exact_delta_loss(model, ids, key, ablation, means)
        assert abs(exact) > 1e-8, key
        assert profile.score(key) == pytest.approx(exact, rel=2e-2), key
    assert profile.method["neuron_group"] == 16


def test_neuron_attribution_tracks_exact_mean_ablation_on_the_plain_model():
    """Without the scaling, one group of 4 of 64 neurons is still a small perturbation: same sign
    where the effect is clear, and the same order of magnitude."""
    model, ids = tiny_model("llama").double(), tiny_windows(8, 16)
    adapter = get_adapter(model)
    profile = profile_attribution(model, ids, AttributionConfig(ablation="mean", unit_kinds=("neurons",),
                                                                neuron_group=4, batch_size=8), progress=False)
    means = collect_means(model, adapter, [ids])
    keys = [k for k in profile.units("neurons") if parse_unit(k).layer == 2]
    exact = torch.tensor([_exact_delta_loss(model, ids, k, "mean", means) for k in keys])
    est = torch.tensor([profile.score(k) for k in keys])
    clear = exact.abs() > 0.2 * exact.abs().max()
    assert clear.sum() >= 3 and (torch.sign(est[clear]) == torch.sign(exact[clear])).all()
    ratio = (est.abs().sum() / exact.abs().sum()).item()
    assert 0.5 < ratio < 2.0, ratio
    assert torch.corrcoef(torch.stack([est, exact]))[0, 1] > 0.8


def test_attribution_scores_neurons_with_other_kinds_in_one_pass():
    model, ids = tiny_model("qwen2"), tiny_windows(4, 16)
    both = profile_attribution(model, ids, AttributionConfig(unit_kinds=("mlp", "neurons")), progress=False)
    alone = profile_attribution(model, ids, AttributionConfig(unit_kinds=("neurons",)), progress=False)
    assert set(both.units("neurons")) == set(alone.units("neurons")) == {f"L{i}.mlp.N0-63" for i in range(4)}
    for key in alone.units("neurons"):
        assert both.score(key) == pytest.approx(alone.score(key), rel=1e-9, abs=1e-12)
    assert both.cost["backwards"] == 4 // 4 * 2
