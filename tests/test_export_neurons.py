"""Neuron-pruned exports: the sidecar records the MLP sizes, uniform ones load with plain
transformers, per-layer ones with load_compressed, and both compute the exported model's logits,
also combined with dropped layers, pruned heads, quantization and kept LoRA adapters."""
from __future__ import annotations

import json

import pytest
import torch
from tiny import FAMILIES, tiny_model, tiny_tokenizer, tiny_windows

from mi_opt.arch import get_adapter
from mi_opt.artifacts import model_fingerprint
from mi_opt.export import SIDECAR, export, load_compressed, reference_logits, stored_parameters
from mi_opt.plan import CompressionPlan
from mi_opt.surgery import apply_
from mi_opt.surgery.neurons import mlp_sizes


def _plan(model, **kw) -> CompressionPlan:
    return CompressionPlan(model={"spec": "tiny", "fingerprint": model_fingerprint(model), "n_layers": 4},
                           predicted={"parameters_before": sum(p.numel() for p in model.parameters())}, **kw)


def _uniform(model, fraction: int = 4) -> dict[int, list[int]]:
    """Every fraction-th neuron of every layer."""
    width = get_adapter(model).mlp_width(0)
    return {i: list(range(i % fraction, width, fraction)) for i in range(4)}


def _free(model) -> dict[int, list[int]]:
    width = get_adapter(model).mlp_width(0)
    return {0: [0, 1, width - 1], 1: list(range(5, width // 2)), 3: [4]}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _stored_logits(model, ids, dtype=torch.bfloat16):
    return reference_logits(model, ids, stored_parameters(model, dtype))


def _as_stored_(model, dtype=torch.bfloat16) -> None:
    """Round the model's weights to what a default export stores (so generate() compares like with like)."""
    with torch.no_grad():
        for name, weight in stored_parameters(model, dtype).items():
            model.get_parameter(name).copy_(weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_neuron_export_loads_with_plain_transformers_and_generates(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, attn_implementation="sdpa")
    width = get_adapter(model).mlp_width(0)
    plan = _plan(model, prune_neurons=_uniform(model), neuron_mode="uniform")
    apply_(model, plan)
    out = export(model, tiny_tokenizer(), plan, tmp_path / "out")
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["loader"] == "transformers" and sidecar["loader_reason"] is None
    assert sidecar["mlp_sizes"] == [width * 3 // 4] * 4 and sidecar["version"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert mlp_sizes(reloaded) == [width * 3 // 4] * 4
    ids = tiny_windows(2, 12)
    torch.testing.assert_close(_logits(reloaded, ids), _stored_logits(model, ids), atol=1e-5, rtol=1e-5)
    _as_stored_(model)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)  # with the KV cache
    with torch.no_grad():
        assert torch.equal(reloaded.generate(ids[:1, :5], **kw), model.generate(ids[:1, :5], **kw))
    card = (out / "README.md").read_text()
    assert "MLP neurons" in card and "from_pretrained" in card


@pytest.mark.parametrize("family", FAMILIES)
def test_free_neuron_export_loads_with_load_compressed(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, attn_implementation="sdpa")
    prune = _free(model)
    plan = _plan(model, prune_neurons=prune, neuron_mode="free")
    apply_(model, plan)
    sizes = mlp_sizes(model)
    out = export(model, None, plan, tmp_path / "free")
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["loader"] == "mi_opt" and "MLP sizes per layer" in sidecar["loader_reason"]
    assert sidecar["mlp_sizes"] == sizes
    reloaded = load_compressed(out, dtype="fp32")
    assert mlp_sizes(reloaded) == sizes
    ids = tiny_windows(2, 12)
    torch.testing.assert_close(_logits(reloaded, ids), _stored_logits(model, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception):  # what the card warns of: plain transformers builds the config's sizes
        AutoModelForCausalLM.from_pretrained(out)
    assert "load_compressed" in (out / "README.md").read_text()


def test_neurons_with_dropped_layers_free_heads_and_fp32_storage(tmp_path):
    model = tiny_model("qwen2")
    plan = _plan(model, drop_layers=[2], prune_heads={0: [1], 3: [0, 2]}, head_mode="free",
                 prune_neurons={0: [3, 4], 1: list(range(20)), 2: [1], 3: [9]}, neuron_mode="free")
    apply_(model, plan)
    assert mlp_sizes(model) == [62, 44, 63]
    out = export(model, None, plan, tmp_path / "mixed", dtype="fp32")
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["n_layers"] == 3 and sidecar["mlp_sizes"] == [62, 44, 63]
    assert "head counts" in sidecar["loader_reason"] and "MLP sizes" in sidecar["loader_reason"]
    ids = tiny_windows(2, 12)
    torch.testing.assert_close(_logits(load_compressed(out), ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_uniform_neurons_with_uniform_heads_and_dropped_layers_stay_plain(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    plan = _plan(model, drop_layers=[1], prune_heads={i: [1, 3] for i in range(4)}, head_mode="uniform",
                 prune_neurons={i: list(range(32)) for i in (0, 2, 3)}, neuron_mode="uniform")
    apply_(model, plan)
    out = export(model, None, plan, tmp_path / "plain")
    assert json.loads((out / SIDECAR).read_text())["loader"] == "transformers"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.intermediate_size == 32 and reloaded.config.num_hidden_layers == 3
    ids = tiny_windows(2, 12)
    torch.testing.assert_close(_logits(reloaded, ids), _stored_logits(model, ids), atol=1e-5, rtol=1e-5)


def test_quantized_neuron_pruned_layers_reload(tmp_path):
    """Neurons go first, then bitsandbytes quantizes the narrower projections (4- and 8-bit)."""
    pytest.importorskip("bitsandbytes")
    model = tiny_model("llama")
    plan = _plan(model, prune_neurons={0: list(range(32)), 1: [0, 1], 3: list(range(40))}, neuron_mode="free",
                 bits={"L0": 4, "L1": 8, "L3.mlp.down_proj": 4})
    apply_(model, plan)
    out = export(model, None, plan, tmp_path / "quant")  # verified by its reload inside
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["mlp_sizes"] == [32, 62, 64, 24] and sidecar["quantization"]["modules"]
    reloaded = load_compressed(out, dtype="fp32")
    assert mlp_sizes(reloaded) == [32, 62, 64, 24]
    ids = tiny_windows(2, 12)
    torch.testing.assert_close(_logits(reloaded, ids), _stored_logits(model, ids), atol=1e-5, rtol=1e-5)
    card = (out / "README.md").read_text()
    assert "Removed 74 MLP neurons in 3 layers (free mode)" in card and "L3: 40" in card


def test_a_sidecar_from_before_neuron_pruning_still_loads(tmp_path):
    model = tiny_model("llama")
    plan = _plan(model, prune_heads={0: [1], 2: [0, 3]}, head_mode="free")
    apply_(model, plan)
    out = export(model, None, plan, tmp_path / "old")
    path = out / SIDECAR
    sidecar = json.loads(path.read_text())
    del sidecar["mlp_sizes"]
    path.write_text(json.dumps({**sidecar, "version": 1}))  # what mi-opt wrote before MLP sizes
    ids = tiny_windows(2, 12)
    torch.testing.assert_close(_logits(load_compressed(out, dtype="fp32"), ids), _stored_logits(model, ids),
                               atol=1e-5, rtol=1e-5)
