"""Attribution patching against exact ablation.

The exact reference is computed here in float64 with the profiler's own interventions
(mi_opt/profile/interventions.py), independently of attribution.py's gradient code.
"Linear by construction": the output projections of one layer are scaled by EPS, so every
unit of that layer adds an O(EPS) vector to the residual stream; the loss change of
removing it is then its first-order term plus O(EPS^2), and attribution must match the
exact ablation to a relative error of order EPS, sign and scale included.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILIES, tiny_model, tiny_windows

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.hooks import attached
from mi_opt.profile.engine import collect_means
from mi_opt.profile.attribution import AttributionConfig, profile_attribution
from mi_opt.profile.interventions import ablation_hooks
from mi_opt.units import parse_unit

EPS = 1e-3
LAYER = 1  # not the last layer: the estimate must carry through the layers after it


def _linear_regime_model():
    model = tiny_model("llama").double()
    layer = get_adapter(model).layers()[LAYER]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.mul_(EPS)
        layer.mlp.down_proj.weight.mul_(EPS)
    return model


def _loss_and_logp(model, ids):
    logp = F.log_softmax(model(ids, use_cache=False).logits[:, :-1], dim=-1)
    return -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).mean(), logp


def _exact(model, ids, unit_key, ablation, means):
    """Exact delta loss and mean KL(clean || ablated) of ablating one unit, in float64."""
    adapter = get_adapter(model)
    with torch.no_grad():
        clean_loss, clean_logp = _loss_and_logp(model, ids)
        with attached(ablation_hooks(adapter, parse_unit(unit_key), ablation, means)):
            loss, logp = _loss_and_logp(model, ids)
    kl = F.kl_div(logp, clean_logp, log_target=True, reduction="none").sum(-1).mean()
    return (loss - clean_loss).item(), kl.item()


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_matches_exact_ablation_where_the_effect_is_linear(ablation):
    model, ids = _linear_regime_model(), tiny_windows(8, 16)
    profile = profile_attribution(model, ids, AttributionConfig(ablation=ablation, batch_size=8),
                                  progress=False)
    adapter = get_adapter(model)
    means = collect_means(model, adapter, [ids]) if ablation == "mean" else None
    keys = [k for k in profile.units() if parse_unit(k).layer == LAYER]
    assert {parse_unit(k).kind for k in keys} == {"layer", "attn", "mlp", "head", "kv_group"}
    for key in keys:
        exact, _ = _exact(model, ids, key, ablation, means)
        assert abs(exact) > 1e-7, key  # the unit has a measurable effect, so the check can fail
        assert profile.score(key) == pytest.approx(exact, rel=2e-2), key


def test_kl_estimate_is_unbiased_for_the_second_order_kl():
    """With many probe draws the Hutchinson estimate approaches the exact (small) KL."""
    model, ids = _linear_regime_model(), tiny_windows(8, 16)
    config = AttributionConfig(unit_kinds=("attn", "mlp"), batch_size=8, kl_samples=150)
    profile = profile_attribution(model, ids, config, progress=False)
    for key in (f"L{LAYER}.attn", f"L{LAYER}.mlp"):
        _, exact_kl = _exact(model, ids, key, "zero", None)
        assert exact_kl > 0
        assert profile.score(key, "kl") == pytest.approx(exact_kl, rel=0.35), key


def test_far_from_linear_the_estimate_differs_and_metadata_says_so():
    model, ids = tiny_model("llama"), tiny_windows(8, 16)
    profile = profile_attribution(model, ids, AttributionConfig(unit_kinds=("layer",)), progress=False)
    assert "poor for whole layers" in profile.method["notes"]
    assert profile.method["first_order"] is True


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_every_family(family):
    model, ids = tiny_model(family), tiny_windows(4, 16)
    requires_grad = [p.requires_grad for p in model.parameters()]
    profile = profile_attribution(model, ids, AttributionConfig(ablation="mean", batch_size=2), progress=False)
    adapter = get_adapter(model)
    n_heads = sum(adapter.heads(i).n_heads for i in range(adapter.n_layers()))
    assert len(profile.units("head")) == n_heads
    assert len(profile.units("layer")) == adapter.n_layers()
    for score in profile.scores.values():
        assert all(torch.isfinite(torch.tensor(v)) for v in (score.delta_loss, score.kl))
        assert score.kl >= 0 and score.delta_loss_se is not None
    assert any(s.delta_loss != 0 for s in profile.scores.values())
    assert profile.cost["forwards"] == 4 and profile.cost["backwards"] == 4  # 2 batches: mean pass + fwd, 1+1 bwd
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were accumulated


def test_works_with_frozen_weights_and_inside_inference_mode():
    model, ids = tiny_model("llama"), tiny_windows(4, 16)
    reference = profile_attribution(model, ids, progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        frozen = profile_attribution(model, ids, progress=False)
    assert frozen.scores == reference.scores


def test_deterministic_for_a_seed_and_seed_changes_only_kl():
    model, ids = tiny_model("llama"), tiny_windows(4, 16)
    a = profile_attribution(model, ids, AttributionConfig(seed=3), progress=False)
    b = profile_attribution(model, ids, AttributionConfig(seed=3), progress=False)
    c = profile_attribution(model, ids, AttributionConfig(seed=4), progress=False)
    assert a.scores == b.scores
    assert all(a.score(k) == c.score(k) for k in a.scores)
    assert any(a.score(k, "kl") != c.score(k, "kl") for k in a.scores)


@pytest.mark.parametrize("bad", [dict(ablation="resample"), dict(kl_samples=0), dict(batch_size=0),
                                 dict(unit_kinds=("neuron",))])
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(MiOptError):
        AttributionConfig(**bad)
