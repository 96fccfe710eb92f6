import pytest
import torch
from tiny import FAMILIES, tiny_model, tiny_windows

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.hooks import Hook, attached
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.profile.interventions import ablation_hooks
from mi_opt.units import Unit


def _scores(profile):
    return {k: (v.delta_loss, v.kl) for k, v in profile.scores.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_fast_engine_equals_naive(family, ablation, monkeypatch):
    monkeypatch.setattr("mi_opt.profile.engine.VOCAB_CHUNK", 100)  # several blocks, a ragged last one
    model, windows = tiny_model(family), tiny_windows(8, 16)
    naive = profile_ablation(model, windows, AblationConfig(ablation=ablation, engine="naive"), progress=False)
    fast = profile_ablation(model, windows, AblationConfig(ablation=ablation, engine="fast",
                                                           ablations_per_forward=3, logit_chunk_tokens=20),
                            progress=False)
    assert naive.scores.keys() == fast.scores.keys()
    for key, (dl, kl) in _scores(naive).items():
        assert fast.scores[key].delta_loss == pytest.approx(dl, abs=2e-5), key
        assert fast.scores[key].kl == pytest.approx(kl, abs=2e-5), key
    assert fast.base_loss == pytest.approx(naive.base_loss, abs=1e-5)
    # Not trivially zero: ablations must change the prediction.
    assert max(v.kl for v in fast.scores.values()) > 1e-3


def test_profiles_are_deterministic():
    windows = tiny_windows(8, 16)
    a = profile_ablation(tiny_model("qwen2", seed=3), windows, AblationConfig(ablation="mean"), progress=False)
    b = profile_ablation(tiny_model("qwen2", seed=3), windows, AblationConfig(ablation="mean"), progress=False)
    assert _scores(a) == _scores(b)
    assert a.model["fingerprint"] == b.model["fingerprint"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zero_ablating_a_head_equals_attention_without_it(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layer = adapter.layers()[1]
    proj = adapter.head_output_proj(layer)
    geo = adapter.heads(1)
    seen = {}
    with torch.no_grad(), attached([Hook(proj, lambda m, a: seen.setdefault("z", a[0]), kind="forward_pre"),
                                    Hook(adapter.attention(layer), lambda m, a, o: seen.setdefault("clean", o[0]))]):
        model(tiny_windows(2, 10))
    with torch.no_grad(), attached(ablation_hooks(adapter, Unit(1, "head", 2), "zero", None) +
                                   [Hook(adapter.attention(layer), lambda m, a, o: seen.setdefault("abl", o[0]))]):
        model(tiny_windows(2, 10))
    # Attention output rebuilt by hand as the sum of every head's contribution except head 2.
    weight = proj.weight if family != "gpt2" else proj.weight.T  # GPT-2 Conv1D stores (in, out)
    hd = geo.head_dim
    by_hand = sum(seen["z"][..., h * hd:(h + 1) * hd] @ weight[:, h * hd:(h + 1) * hd].T
                  for h in range(geo.n_heads) if h != 2) + (proj.bias if proj.bias is not None else 0)
    assert torch.allclose(seen["abl"], by_hand, atol=1e-5)
    assert not torch.allclose(seen["abl"], seen["clean"], atol=1e-4)


def test_skipped_layer_passes_its_input_through():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    layer = adapter.layers()[2]
    seen = {}
    hooks = ablation_hooks(adapter, Unit(2, "layer"), "zero", None) + [
        Hook(layer, lambda m, a, k: seen.update(inp=a[0] if a else k["hidden_states"]), kind="forward_pre",
             with_kwargs=True),
        Hook(adapter.layers()[3], lambda m, a, k: seen.update(next_in=a[0] if a else k["hidden_states"]),
             kind="forward_pre", with_kwargs=True)]
    with torch.no_grad(), attached(hooks):
        model(tiny_windows(2, 10))
    assert torch.equal(seen["inp"], seen["next_in"])


def test_kv_group_ablates_all_its_heads():
    model, windows = tiny_model("llama"), tiny_windows(4, 12)
    adapter = get_adapter(model)
    with torch.no_grad():
        with attached(ablation_hooks(adapter, Unit(0, "kv_group", 1), "zero", None)):
            group = model(windows).logits
        with attached(ablation_hooks(adapter, Unit(0, "head", 2), "zero", None) +
                      ablation_hooks(adapter, Unit(0, "head", 3), "zero", None)):
            heads = model(windows).logits
    assert torch.allclose(group, heads, atol=1e-6)


def test_profile_json_round_trip_and_standard_errors(tmp_path):
    profile = profile_ablation(tiny_model("llama"), tiny_windows(8, 16), AblationConfig(batch_size=2,
                               unit_kinds=("layer", "head")), progress=False)
    assert profile.calibration["n_batches"] == 4
    assert all(v.delta_loss_se is not None and v.delta_loss_se >= 0 for v in profile.scores.values())
    path = profile.save(tmp_path / "p.json")
    again = ImportanceProfile.load(path)
    assert _scores(again) == _scores(profile)
    assert again.versions["torch"] and again.model["n_layers"] == 4
    assert set(again.units("layer")) == {"L0", "L1", "L2", "L3"}


def test_bad_config():
    with pytest.raises(MiOptError, match="ablation must be one of"):
        AblationConfig(ablation="resample-ish")
    with pytest.raises(MiOptError, match="unknown unit kind"):
        profile_ablation(tiny_model("llama"), tiny_windows(2, 8), AblationConfig(unit_kinds=("synapses",)),
                         progress=False)


def exp_with_mass(mass: float):
    """Tensor.exp scaled so probabilities sum to `mass`: a trained model's sharp fp32 distributions
    over a 49k vocabulary miss 1 by ~1e-5, which times an lse of ~30 nats biased every KL."""
    real = torch.Tensor.exp
    return lambda self: real(self) * mass


def test_clean_reference_scores_the_clean_run_as_zero_kl_when_fp32_mass_is_not_one(monkeypatch):
    from mi_opt.profile.engine import CleanReference

    adapter, ids = get_adapter(tiny_model("llama")), tiny_windows(4, 16)
    with torch.inference_mode():
        final = adapter.decoder()(ids, use_cache=False).last_hidden_state
        monkeypatch.setattr(torch.Tensor, "exp", exp_with_mass(1 + 1e-4))
        ref = CleanReference(adapter, final, ids, chunk=16)
        monkeypatch.undo()
        assert ref.linear                                     # the folded p @ W path
        _, kl = ref.score(final)
    assert kl.abs().max() < 1e-6   # without the mass weighting: -1e-4 * lse, about -7e-4
