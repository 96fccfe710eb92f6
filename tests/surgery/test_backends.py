"""Quantization backends behind one registry: each quantizes what the plan names, its export reloads
with the in-memory model's logits, and what it cannot do is refused before anything changes."""
from __future__ import annotations

import json

import pytest
import torch
from tiny import VOCAB, _config, tiny_model

from mi_opt.artifacts import model_fingerprint
from mi_opt.errors import MiOptError
from mi_opt.export import SIDECAR, export, load_compressed
from mi_opt.plan import CompressionPlan
from mi_opt.quant import BACKENDS, QuantOptions, backend_of, get_backend
from mi_opt.surgery import apply_, check_plan

pytest.importorskip("torchao")

IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
EVERY_LINEAR = {f"L{i}": 8 for i in range(4)}


def _plan(model, **kw) -> CompressionPlan:
    return CompressionPlan(model={"spec": "tiny", "fingerprint": model_fingerprint(model), "n_layers": 4}, **kw)


def _logits(model):
    with torch.inference_mode():
        return model(IDS, use_cache=False).logits


def _tied_llama():
    from transformers import AutoModelForCausalLM

    config = _config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_registry_lists_the_backends_and_what_each_offers():
    assert BACKENDS.names() == ["bitsandbytes", "gguf", "torchao"]
    assert get_backend("bitsandbytes").formats == {8: ("llm.int8",), 4: ("nf4", "fp4")}
    assert get_backend("torchao").widths() == (8, 16)
    assert get_backend("gguf").formats[8] == ("Q8_0",)
    for name in BACKENDS.names():
        info = get_backend(name).describe()
        assert info["version"] and info["serialization"] and info["devices"]
    with pytest.raises(MiOptError, match="unknown quantization backend 'torchoa'.*'torchao'"):
        get_backend("torchoa")
    with pytest.raises(MiOptError, match="unknown quantization backend"):
        CompressionPlan(model={"fingerprint": "x"}, backend="awq")


def test_plan_files_without_a_backend_read_as_bitsandbytes(tmp_path):
    plan = _plan(tiny_model(), bits={"L0": 8})
    d = plan.to_dict()
    del d["backend"]
    assert CompressionPlan.from_dict(d).backend == "bitsandbytes"
    plan.backend, plan.quant_type = "torchao", None
    plan.save(tmp_path / "p.json")
    assert CompressionPlan.load(tmp_path / "p.json").backend == "torchao"


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "gpt2"])
def test_torchao_int8_export_reloads_with_identical_logits(tmp_path, family):
    model = tiny_model(family)
    reference = _logits(model)
    plan = _plan(model, bits=EVERY_LINEAR, backend="torchao", quant_type=None)
    apply_(model, plan)
    assert backend_of(model).name == "torchao"
    layer = model.get_submodule("transformer.h.0" if family == "gpt2" else "model.layers.0")
    assert all(type(m.weight).__name__ == "Int8Tensor" for m in layer.modules() if isinstance(m, torch.nn.Linear))
    quantized = _logits(model)
    assert 0 < (quantized - reference).abs().max() < 0.1 * reference.abs().max()  # int8 weights: close, not equal
    out = export(model, None, plan, tmp_path / "x", dtype="fp32")
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["quantization"]["backend"] == "torchao" and len(sidecar["quantization"]["modules"]) == 4 * (
        4 if family == "gpt2" else 7)
    assert torch.equal(_logits(load_compressed(out, attn_implementation="eager")), quantized)
    if family == "gpt2":  # Conv1D projections quantized as nn.Linear: only mi-opt rebuilds them
        assert sidecar["loader"] == "mi_opt" and "Conv1D" in sidecar["loader_reason"]
    else:
        from transformers import AutoModelForCausalLM

        assert sidecar["loader"] == "transformers"
        assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
        assert torch.equal(_logits(plain), quantized)


def test_torchao_per_module_mix_and_bf16_storage_reload_like_the_export_check(tmp_path):
    model = tiny_model("llama")
    plan = _plan(model, bits={"L0": 8, "L2.mlp.down_proj": 8, "L3": 8, "L3.self_attn.v_proj": 16},
                 backend="torchao", quant_type=None)
    apply_(model, plan)
    out = export(model, None, plan, tmp_path / "x")  # unquantized weights stored in bf16
    modules = json.loads((out / SIDECAR).read_text())["quantization"]["modules"]
    assert "model.layers.3.self_attn.v_proj" not in modules and "model.layers.2.mlp.down_proj" in modules
    assert "model.layers.2.mlp.up_proj" not in modules
    assert json.loads((out / SIDECAR).read_text())["verified_max_logit_diff"] == 0.0
    card = (out / "README.md").read_text()
    # tiny Llama: 32 inputs (per row; 64 does not fit), down_proj's 64 (one group per row)
    assert "Quantized with torchao: 14 modules at 8 bit (int8-weight-only, one scale per row; torchao" in card
    assert "LLM.int8" not in card


def test_torchao_quantizes_an_untied_lm_head_and_refuses_a_tied_one_or_the_embedding(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    plan = _plan(model, bits={**EVERY_LINEAR, "lm_head": 8}, backend="torchao", quant_type=None)
    apply_(model, plan)
    assert type(model.lm_head.weight).__name__ == "Int8Tensor"
    out = export(model, None, plan, tmp_path / "x", dtype="fp32")
    assert json.loads((out / SIDECAR).read_text())["loader"] == "transformers"
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert type(plain.lm_head.weight).__name__ == "Int8Tensor"
    assert torch.equal(_logits(plain), _logits(model))

    tied = _tied_llama()
    before = model_fingerprint(tied)
    with pytest.raises(MiOptError, match="tied to the embedding matrix"):
        apply_(tied, _plan(tied, bits={"L0": 8, "lm_head": 8}, backend="torchao", quant_type=None))
    with pytest.raises(MiOptError, match="bits\\['embed'\\] < 16: mi-opt quantizes only linear weights with torchao"):
        apply_(tied, _plan(tied, bits={"L0": 8, "embed": 8}, backend="torchao", quant_type=None))
    assert model_fingerprint(tied) == before and tied.lm_head.weight is tied.model.embed_tokens.weight


@pytest.mark.parametrize("backend, bits, quant_type, match", [
    ("torchao", {"L0": 4}, None, "4-bit weights, which quantization backend torchao does not offer: torchao 0.18's "
                                 "int4 weight-only layouts have no CPU kernel"),
    ("gguf", {"L0": 4}, "nf4", "backend gguf has no 4-bit format 'nf4'; it offers Q4_0, Q4_1, Q5_0, Q5_1"),
    ("bitsandbytes", {"embed": 8}, "nf4", "cannot quantize token embeddings with bitsandbytes"),
])
def test_what_a_backend_lacks_is_refused_before_anything_changes(tmp_path, backend, bits, quant_type, match):
    model = tiny_model("llama")
    before = model_fingerprint(model)
    plan = _plan(model, bits=bits, prune_heads={i: [0, 1] for i in range(4)}, backend=backend, quant_type=quant_type)
    with pytest.raises(MiOptError, match=match):
        check_plan(model, plan)
    with pytest.raises(MiOptError, match=match):
        apply_(model, plan)
    assert model_fingerprint(model) == before  # heads were not pruned either
    assert not list(tmp_path.iterdir())


def test_bitsandbytes_through_the_registry_is_what_it_was():
    pytest.importorskip("bitsandbytes")
    from mi_opt.surgery.quantize import quantize_, quantized_modules

    bits = {"L0": 8, "L1": 4, "L1.mlp.down_proj": 8}
    direct, registry = tiny_model("llama"), tiny_model("llama")
    quantize_(direct, bits, "fp4", 6.0)
    get_backend("bitsandbytes").quantize_(registry, bits, QuantOptions("fp4", 6.0))
    assert quantized_modules(direct) == quantized_modules(registry)
    assert torch.equal(_logits(direct), _logits(registry))
    assert backend_of(registry).name == "bitsandbytes"


def test_gguf_backend_round_trips_weights_and_ships_only_as_gguf(tmp_path):
    import gguf

    from mi_opt.formats.gguf import ggml_round_trip

    model = tiny_model("llama")
    weight = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    plan = _plan(model, bits={"L0": 8, "L1": 4}, backend="gguf", quant_type="Q4_1")
    apply_(model, plan)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, ggml_round_trip(weight, gguf.GGMLQuantizationType.Q8_0)[1])
    q = get_backend("gguf").quantized_linear(torch.nn.Linear(64, 32), 4, QuantOptions("Q4_1"))
    assert isinstance(q, torch.nn.Linear)
    with pytest.raises(MiOptError, match="backend gguf, which export format safetensors does not carry"):
        export(model, None, plan, tmp_path / "x")
    with pytest.raises(MiOptError, match="measured as Q4_1, but the GGUF export would write Q4_0"):
        export(model, None, plan, tmp_path / "g", format="gguf")
    assert not list(tmp_path.iterdir())


def test_gguf_backend_quantizes_a_tied_embedding_once():
    import gguf

    from mi_opt.formats.gguf import ggml_round_trip

    tied = _tied_llama()
    weight = tied.model.embed_tokens.weight.detach().clone()
    apply_(tied, _plan(tied, bits={"embed": 8, "lm_head": 8}, backend="gguf", quant_type=None))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight  # still tied, rounded once
    assert torch.equal(tied.lm_head.weight, ggml_round_trip(weight, gguf.GGMLQuantizationType.Q8_0)[1])
    with pytest.raises(MiOptError, match="ties them: in GGUF they are one tensor"):
        apply_(_tied_llama(), _plan(_tied_llama(), bits={"embed": 8, "lm_head": 4}, backend="gguf", quant_type=None))


def test_torchao_scale_groups_reload_identically_and_fall_back_to_rows(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from mi_opt.quant import torchao_backend

    monkeypatch.setattr(torchao_backend, "GROUP", 32)  # tiny widths: 32 inputs (per row), 64 (two groups)
    model = tiny_model("llama")
    plan = _plan(model, bits=EVERY_LINEAR, backend="torchao", quant_type=None)
    apply_(model, plan)
    assert list(model.model.layers[0].mlp.down_proj.weight.block_size) == [1, 32]
    assert list(model.model.layers[0].mlp.up_proj.weight.block_size) == [1, 32]  # whole rows of 32
    out = export(model, None, plan, tmp_path / "x", dtype="fp32")
    groups = json.loads((out / SIDECAR).read_text())["quantization"]["scale_groups"]
    assert groups["model.layers.0.mlp.down_proj"] == 32 and groups["model.layers.0.mlp.up_proj"] is None
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert list(plain.model.layers[0].mlp.down_proj.weight.block_size) == [1, 32]
    assert torch.equal(_logits(plain), _logits(model))
    assert torch.equal(_logits(load_compressed(out, attn_implementation="eager")), _logits(model))
    sizes = get_backend("torchao").quantized_bytes(32 * 64, 32, 8)
    assert sizes == 32 * 64 + 4 * 32 * 2  # int8 weights + one fp32 scale per group of 32
