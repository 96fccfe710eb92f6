"""SmolLM2 end to end: profile, plan (drop 6 layers, a third of the heads), apply, export, reload, generate."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from mi_opt.export import SIDECAR, export, load_compressed, reference_logits, stored_parameters
from mi_opt.policy import make_plan
from mi_opt.profile.baselines import WeightMagnitudeConfig, profile_weight_magnitude
from mi_opt.surgery import apply_

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol_plan(smollm2):
    model, _ = smollm2
    # Scores from the data-free weight-magnitude scorer keep this test short: the checks below are
    # about surgery, export and reload on the real model, not about score quality (the causal
    # profiler has its own tests, and a full ablation sweep of 300 units is minutes on 2 cores).
    profile = profile_weight_magnitude(model, config=WeightMagnitudeConfig(unit_kinds=("layer", "head")),
                                       model_spec="smollm2-135m", progress=False)
    plan = make_plan(profile, "combined", {"layer_skip": {"n_drop": 6},
                                           "head_prune": {"fraction": 1 / 3, "mode": "uniform"}}, model)
    return profile, plan


def _generate(model, tok, use_cache=True) -> torch.Tensor:
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=use_cache,
                              pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]


@pytest.mark.integration
def test_layers_and_uniform_heads_export_loads_with_plain_transformers(smollm2, smol_plan, tmp_path):
    from transformers import AutoModelForCausalLM

    base, tok = smollm2
    profile, plan = smol_plan
    assert len(plan.drop_layers) == 6 and 0 not in plan.drop_layers and 29 not in plan.drop_layers
    assert sum(len(h) for h in plan.prune_heads.values()) == 24 * 3  # 9 -> 6 heads in each of 24 layers
    model = apply_(copy.deepcopy(base), plan)
    params = sum(p.numel() for p in model.parameters())
    assert params == plan.predicted["parameters"] < plan.predicted["parameters_before"]
    out = export(model, tok, plan, tmp_path / "smol", profile=profile)
    assert json.loads((out / SIDECAR).read_text())["loader"] == "transformers"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16  # stored at half of fp32's bytes
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 24 and reloaded.config.num_attention_heads == 6
    with torch.no_grad():
        for name, weight in stored_parameters(model, torch.bfloat16).items():
            model.get_parameter(name).copy_(weight)  # the in-memory model now holds what was stored
    cached = _generate(reloaded, tok)
    assert torch.equal(cached, _generate(reloaded, tok, use_cache=False))
    assert torch.equal(cached, _generate(model, tok))
    assert tok.decode(cached, skip_special_tokens=True).strip()


@pytest.mark.integration
def test_mixed_bits_on_top_export_loads_with_load_compressed(smollm2, smol_plan, tmp_path):
    base, tok = smollm2
    _, plan = smol_plan
    plan = copy.deepcopy(plan)
    kept = [i for i in range(30) if i not in plan.drop_layers]
    plan.bits = {f"L{i}": (8 if j % 2 else 4) for j, i in enumerate(kept)}
    model = apply_(copy.deepcopy(base), plan)
    out = export(model, tok, plan, tmp_path / "smol-q")
    assert json.loads((out / SIDECAR).read_text())["loader"] == "mi_opt"
    reloaded = load_compressed(out, dtype="fp32")  # stored in bf16, computed in fp32 like the in-memory model
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    want = reference_logits(model, ids, stored_parameters(model, torch.bfloat16))
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids).logits, want, atol=1e-4, rtol=1e-4)
    # Logits already match; one generation (bnb on CPU is slow) checks the KV-cache path runs.
    assert tok.decode(_generate(reloaded, tok), skip_special_tokens=True).strip()
