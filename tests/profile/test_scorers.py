"""The scorer registry: one signature, one profile format, deterministic for a seed."""
from __future__ import annotations

import pytest
from tiny import tiny_model, tiny_windows

from mi_opt.errors import MiOptError
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.profile.scorers import SCORERS, run_scorer

EXPECTED = {"ablation", "attribution", "block_influence", "angular_distance", "weight_magnitude", "random"}
NEURONS_ONLY = {"activation", "wanda"}  # MLP neuron-group scorers: no layer scores to compare


def test_every_scorer_is_registered():
    assert set(SCORERS.names()) == EXPECTED | NEURONS_ONLY


@pytest.mark.parametrize("name", sorted(NEURONS_ONLY | {"ablation", "attribution"}))
def test_neuron_scorers_same_format_deterministic_and_round_trip(name, tmp_path):
    model, ids = tiny_model("gpt2"), tiny_windows(4, 16)
    options = {"unit_kinds": ("neurons",), "neuron_group": 32}
    first = run_scorer(name, model, ids, options, progress=False)
    assert first.scores == run_scorer(name, model, ids, options, progress=False).scores
    assert first.units() == [f"L{i}.mlp.N{j}-{j + 31}" for i in range(4) for j in range(0, 128, 32)]
    assert first.cost["wall_time_s"] >= 0 and first.method["neuron_group"] == 32
    loaded = ImportanceProfile.load(first.save(tmp_path / "p.json"))
    assert loaded.scores == first.scores


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_same_format_deterministic_and_round_trips(name, tmp_path):
    model, ids = tiny_model("llama"), tiny_windows(4, 16)
    options = {"unit_kinds": ("layer",)}
    first = run_scorer(name, model, ids, options, calibration={"source": "tiny"}, model_spec="tiny", progress=False)
    second = run_scorer(name, model, ids, options, calibration={"source": "tiny"}, model_spec="tiny", progress=False)
    assert first.scores == second.scores
    assert first.method["scorer"] == name
    assert first.units() == ["L0", "L1", "L2", "L3"]
    assert first.model["spec"] == "tiny" and first.calibration["source"] == "tiny"
    loaded = ImportanceProfile.load(first.save(tmp_path / "p.json"))
    assert loaded.scores == first.scores and loaded.method == {**first.method, "unit_kinds": ["layer"]}


def test_ablation_entry_is_the_profiler_itself():
    model, ids = tiny_model("llama"), tiny_windows(4, 16)
    config = AblationConfig(unit_kinds=("head",))
    via_registry = SCORERS.get("ablation")(model, ids, config, progress=False)
    assert via_registry.scores == profile_ablation(model, ids, config, progress=False).scores


def test_a_dead_layer_scores_nothing_and_baselines_rank_it_last():
    """A layer whose output projections are zeroed does nothing: causal scorers give it 0 (other
    layers of a random model may even help when removed), the non-negative baselines rank it last."""
    import torch

    model, ids = tiny_model("llama"), tiny_windows(8, 16)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    for name in ("ablation", "attribution"):
        profile = run_scorer(name, model, ids, {"unit_kinds": ("layer",)}, progress=False)
        assert profile.score("L2") == pytest.approx(0, abs=1e-6), name
        assert max(abs(profile.score(k)) for k in profile.units()) > 1e-3, name
    for name in ("block_influence", "angular_distance", "weight_magnitude"):
        profile = run_scorer(name, model, ids, {"unit_kinds": ("layer",)}, progress=False)
        assert min(profile.units("layer"), key=profile.score) == "L2", name
        if name != "weight_magnitude":  # its input passes through unchanged
            assert profile.score("L2") == pytest.approx(0, abs=1e-4), name


def test_mistakes_are_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(MiOptError, match="Did you mean 'attribution'"):
        SCORERS.get("atribution")
    with pytest.raises(MiOptError, match="no option"):
        run_scorer("random", model, None, {"batch_size": 4})
    with pytest.raises(MiOptError, match="needs calibration windows"):
        run_scorer("block_influence", model, None)
    with pytest.raises(MiOptError, match="takes a AttributionConfig"):
        SCORERS.get("attribution")(model, tiny_windows(2, 8), AblationConfig())


def test_unit_kinds_from_a_comma_string():
    profile = run_scorer("weight_magnitude", tiny_model("llama"), None, {"unit_kinds": "attn, mlp"}, progress=False)
    assert {k.split(".")[1] for k in profile.scores} == {"attn", "mlp"}
