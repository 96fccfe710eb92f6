"""SmolLM2 narrowed for real: uniform MLP sizes load with plain transformers, per-layer ones with
load_compressed, and a uniform GGUF says the new feed_forward_length; every export reloads to the
logits it verified."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from mi_opt.artifacts import model_fingerprint
from mi_opt.export import SIDECAR, export, load_compressed, reference_logits, stored_parameters
from mi_opt.plan import CompressionPlan
from mi_opt.surgery import apply_

WIDTH = 1536  # SmolLM2-135M's intermediate_size


def _plan(model, **kw) -> CompressionPlan:
    return CompressionPlan(model={"spec": "smollm2-135m", "fingerprint": model_fingerprint(model), "n_layers": 30},
                           predicted={}, **kw)


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids


@pytest.mark.integration
def test_uniform_and_free_neuron_exports_reload(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    source, tokenizer = smollm2
    ids = _ids(tokenizer)
    model = copy.deepcopy(source)
    plan = _plan(model, drop_layers=[20], prune_neurons={i: list(range(0, WIDTH, 3)) for i in range(30)},
                 neuron_mode="uniform")
    apply_(model, plan)
    out = export(model, tokenizer, plan, tmp_path / "uniform")
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["loader"] == "transformers" and sidecar["mlp_sizes"] == [1024] * 29
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = reference_logits(model, ids, stored_parameters(model, torch.bfloat16))
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids).logits, want, atol=1e-4, rtol=1e-4)

    model = copy.deepcopy(source)
    plan = _plan(model, prune_neurons={i: list(range(0, WIDTH, 2 + i % 3)) for i in range(30)}, neuron_mode="free")
    apply_(model, plan)
    out = export(model, tokenizer, plan, tmp_path / "free")
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["loader"] == "mi_opt" and sidecar["mlp_sizes"][:3] == [768, 1024, 1152]
    want = reference_logits(model, ids, stored_parameters(model, torch.bfloat16))
    with torch.inference_mode():
        torch.testing.assert_close(load_compressed(out, dtype="fp32")(ids).logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.integration
def test_a_uniform_neuron_gguf_says_the_new_feed_forward_length(smollm2, tmp_path):
    import gguf

    from mi_opt.formats.gguf import apply_structure_

    source, tokenizer = smollm2
    model = copy.deepcopy(source)
    plan = _plan(model, prune_neurons={i: list(range(0, WIDTH, 3)) for i in range(30)}, neuron_mode="uniform",
                 bits={f"L{i}": 4 for i in range(0, 30, 2)})
    apply_structure_(model, plan)
    out = export(model, tokenizer, plan, tmp_path / "gguf", format="gguf")  # verified by a transformers reload
    assert gguf.GGUFReader(out / "model.gguf").fields["llama.feed_forward_length"].contents() == 1024
    assert json.loads((out / SIDECAR).read_text())["verified_max_logit_diff"] <= 1e-4
