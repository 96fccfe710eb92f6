"""Large-model paths of the ablation profiler: accelerate dispatch/offload, a bounded residual
cache, and scoring a subset of units (one shard of a distributed run)."""
from __future__ import annotations

import pytest
from tiny import tiny_model, tiny_windows

from mi_opt.errors import MiOptError
from mi_opt.profile.ablation import AblationConfig, profile_ablation

KINDS = ("layer", "attn", "mlp", "head")


def assert_same_scores(a, b, keys=None):
    assert a.base_loss == pytest.approx(b.base_loss, abs=1e-6)
    for key in keys or a.scores:
        for metric in ("delta_loss", "kl"):
            assert a.score(key, metric) == pytest.approx(b.score(key, metric), abs=1e-5), (key, metric)


@pytest.fixture(scope="module")
def reference():
    return {ablation: profile_ablation(tiny_model("llama"), tiny_windows(8, 16),
                                       AblationConfig(unit_kinds=KINDS, ablation=ablation), progress=False)
            for ablation in ("zero", "mean")}


def _cpu_split_map(model) -> dict[str, str]:
    """Every top-level piece its own device_map entry, so each gets its own AlignDevicesHook."""
    pieces = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
    pieces += [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    return {name: "cpu" for name in pieces}


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_dispatched_model_profiles_like_the_plain_one(reference, ablation):
    from accelerate import dispatch_model

    model = tiny_model("llama")
    model = dispatch_model(model, device_map=_cpu_split_map(model), force_hooks=True)  # hooks even on one device
    assert hasattr(model.model.layers[0], "_hf_hook")
    got = profile_ablation(model, tiny_windows(8, 16), AblationConfig(unit_kinds=KINDS, ablation=ablation),
                           progress=False)
    assert_same_scores(got, reference[ablation])


def test_cpu_offloaded_model_profiles_like_the_plain_one(reference):
    from accelerate import cpu_offload

    model = cpu_offload(tiny_model("llama"), execution_device="cpu")
    assert next(model.model.layers[0].parameters()).device.type == "meta"   # weights live off-module
    got = profile_ablation(model, tiny_windows(8, 16), AblationConfig(unit_kinds=KINDS, ablation="mean"),
                           progress=False)
    assert_same_scores(got, reference["mean"])


def test_disk_offloaded_layers_profile_like_the_plain_one(reference, tmp_path):
    from accelerate import dispatch_model

    model = tiny_model("llama")
    device_map = {**_cpu_split_map(model), "model.layers.2": "disk", "model.layers.3": "disk"}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path), main_device="cpu")
    assert next(model.model.layers[3].parameters()).device.type == "meta"
    got = profile_ablation(model, tiny_windows(8, 16), AblationConfig(unit_kinds=KINDS), progress=False)
    assert_same_scores(got, reference["zero"])


def test_from_pretrained_auto_device_map_with_disk_offload(reference, tmp_path):
    """The path `load_model(spec, device="auto")` takes for a model bigger than memory."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map="auto", max_memory={"cpu": "40KB"},
                                                 offload_folder=str(tmp_path / "offload")).eval()
    assert "disk" in set(model.hf_device_map.values())
    got = profile_ablation(model, tiny_windows(8, 16), AblationConfig(unit_kinds=KINDS), progress=False)
    assert_same_scores(got, reference["zero"])


@pytest.mark.parametrize("budget_mb", [0.004, 1e-6])  # about 2 of 4 layers cached; only layer 0
def test_cache_budget_gives_same_scores_with_sparser_cache(reference, budget_mb):
    got = profile_ablation(tiny_model("llama"), tiny_windows(8, 16),
                           AblationConfig(unit_kinds=KINDS, cache_budget_mb=budget_mb), progress=False)
    assert got.cost["cache_stride"] > 1
    assert got.cost["full_forward_equivalents"] > reference["zero"].cost["full_forward_equivalents"]
    assert_same_scores(got, reference["zero"])


def test_generous_cache_budget_keeps_every_layer(reference):
    got = profile_ablation(tiny_model("llama"), tiny_windows(8, 16),
                           AblationConfig(unit_kinds=KINDS, cache_budget_mb=1024), progress=False)
    assert got.cost["cache_stride"] == 1
    assert got.cost["full_forward_equivalents"] == reference["zero"].cost["full_forward_equivalents"]


def test_cache_budget_must_be_positive():
    with pytest.raises(MiOptError, match="cache_budget_mb"):
        AblationConfig(cache_budget_mb=0)


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_unit_subset_scores_only_those_units(reference, engine):
    keys = ["L3.H1", "L0", "L2.mlp"]
    got = profile_ablation(tiny_model("llama"), tiny_windows(8, 16), AblationConfig(unit_kinds=KINDS, engine=engine),
                           progress=False, units=keys)
    assert list(got.scores) == keys and got.cost["n_units"] == 3
    assert_same_scores(got, reference["zero"], keys)


def test_unit_subset_rejects_unknown_units():
    with pytest.raises(MiOptError, match="L9"):
        profile_ablation(tiny_model("llama"), tiny_windows(4, 16), AblationConfig(unit_kinds=("layer",)),
                         progress=False, units=["L9"])
