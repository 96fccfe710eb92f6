"""Per-module bitsandbytes quantization: the right modules, close outputs, exact save/load round trips."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny import FAMILIES, VOCAB, tiny_model

from mi_opt.errors import MiOptError
from mi_opt.surgery.quantize import (SafeLinear4bit, quantized_linear, _skip_entry_matches, hf_skip_modules,
                                     load_quantized_, quantize_, quantized_modules, save_quantized, untie_lm_head_)

bnb = pytest.importorskip("bitsandbytes")


def packable_llama(n_layers: int = 4, tie: bool = False, seed: int = 0):
    """Tiny Llama whose projections fit bnb's fused CPU 4-bit kernel (out % 32 == 0, in % 64 == 0),
    so a forward pass repacks the weights: the layout behind the save/load trap."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return model.eval()


IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.inference_mode():
        return model(IDS).logits


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("width", [8, 4])
def test_replaces_exactly_the_named_modules(width):
    model = packable_llama()
    applied = quantize_(model, {"L1": width, "L2.self_attn.q_proj": width, "L3.mlp": width})
    layer1 = {f"model.layers.1.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    expected = layer1 | {"model.layers.2.self_attn.q_proj"} | {f"model.layers.3.mlp.{p}" for p in
                                                               ("gate_proj", "up_proj", "down_proj")}
    assert applied == {n: width for n in expected}
    found = quantized_modules(model)
    assert set(found) == expected and all(b == width for b, _ in found.values())
    cls = bnb.nn.Linear8bitLt if width == 8 else bnb.nn.Linear4bit
    assert all(isinstance(model.get_submodule(n), cls) for n in expected)
    assert type(model.model.layers[2].self_attn.k_proj) is torch.nn.Linear
    assert type(model.lm_head) is torch.nn.Linear


def test_module_key_overrides_layer_key_and_16_leaves_alone():
    model = packable_llama()
    applied = quantize_(model, {"L1": 4, "L1.mlp.down_proj": 16, "L1.self_attn.o_proj": 8, "L0": 16})
    assert "model.layers.1.mlp.down_proj" not in applied
    assert applied["model.layers.1.self_attn.o_proj"] == 8 and applied["model.layers.1.self_attn.q_proj"] == 4
    assert not any(n.startswith("model.layers.0.") for n in applied)


@pytest.mark.parametrize("width,tol", [(8, 0.15), (4, 0.6)])
def test_outputs_close_to_full_precision(width, tol):
    model = packable_llama()
    ref = logits(model)
    quantize_(model, {f"L{i}": width for i in range(4)})
    out = logits(model)
    assert not torch.equal(out, ref)          # something was quantized
    assert rel_err(out, ref) < tol
    assert rel_err(out, ref) > 0


def test_int8_closer_than_nf4():
    ref = logits(packable_llama())
    errs = {}
    for width in (8, 4):
        model = packable_llama()
        quantize_(model, {f"L{i}": width for i in range(4)})
        errs[width] = rel_err(logits(model), ref)
    assert errs[8] < errs[4]


def test_int8_outlier_threshold_keeps_outlier_columns_precise():
    """LLM.int8(): input columns with an |activation| above the threshold are multiplied in 16-bit.
    One huge column makes pure int8 round every other column to a coarse grid; 6.0 avoids that."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64)
    x[:, 5] = 60.0                                        # an outlier feature, as trained LLMs have
    ref = linear(x)
    errs = {}
    for threshold in (0.0, 6.0):
        q = quantized_linear(linear, 8, "nf4", threshold)
        assert q.state.threshold == threshold
        with torch.inference_mode():
            errs[threshold] = rel_err(q(x).float(), ref.detach())
    assert errs[6.0] < errs[0.0] / 3


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_threshold_is_recorded_and_reloaded(tmp_path, threshold):
    from transformers import AutoModelForCausalLM

    model = packable_llama()
    quantize_(model, {f"L{i}": 8 for i in range(4)}, int8_threshold=threshold)
    meta = save_quantized(model, tmp_path)
    assert meta["int8_threshold"] == threshold
    assert meta["quantization_config"]["llm_int8_threshold"] == threshold
    fresh = packable_llama(seed=5)
    load_quantized_(fresh, tmp_path, meta)                # mi-opt's loader honours the recorded value
    assert {m.state.threshold for m in fresh.modules() if isinstance(m, bnb.nn.Linear8bitLt)} == {threshold}
    assert torch.equal(logits(fresh), logits(model))
    model.config.quantization_config = meta["quantization_config"]
    model.config.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(logits(reloaded), logits(model))   # and so does plain transformers


def test_int8_threshold_default_and_bad_values(tmp_path):
    model = packable_llama()
    quantize_(model, {"L0": 8})
    assert model.model.layers[0].mlp.up_proj.state.threshold == 6.0
    with pytest.raises(MiOptError, match="int8_threshold must be a number >= 0"):
        quantize_(packable_llama(), {"L0": 8}, int8_threshold=-1)
    quantize_(model, {"L1": 8}, int8_threshold=0.0)
    with pytest.raises(MiOptError, match="different outlier thresholds"):
        save_quantized(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("forward_first", [False, True])
def test_round_trip_identical_logits_even_after_cpu_forward(tmp_path, forward_first):
    model = packable_llama()
    quantize_(model, {"L0": 4, "L1": 8, "L2.mlp.down_proj": 4, "L3.self_attn": 4}, quant_type="nf4")
    before = logits(model) if forward_first else None
    q_proj = model.model.layers[0].self_attn.q_proj
    if forward_first and q_proj.support_avx512bf16_for_cpu:
        assert q_proj.weight.quant_state.packing_format_for_cpu  # the repacked layout is what gets saved
    meta = save_quantized(model, tmp_path)
    after_save = logits(model)
    if before is not None:
        assert torch.equal(after_save, before)   # saving must not corrupt the live model
    assert meta["loader"] == "mi_opt" and meta["quantization_config"] is None
    fresh = packable_llama(seed=7)               # different random weights: everything must be loaded
    load_quantized_(fresh, tmp_path, meta)
    assert quantized_modules(fresh) == quantized_modules(model)
    assert torch.equal(logits(fresh), after_save)


def test_state_dict_twice_after_forward_is_stable():
    model = packable_llama()
    quantize_(model, {"L0": 4})
    ref = logits(model)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    second = model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(logits(model), ref)


def test_plain_bnb_module_with_nested_stats_round_trips(tmp_path):
    """A plain Linear4bit with double quantization (as transformers may load one): saved canonically."""
    model = packable_llama()
    lin = model.model.layers[1].mlp.up_proj
    plain = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, quant_type="nf4",
                              compress_statistics=True, compute_dtype=torch.float32)
    plain.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, module=plain)
    model.model.layers[1].mlp.up_proj = plain.to("cpu").eval()
    ref = logits(model)
    meta = save_quantized(model, tmp_path)
    assert torch.equal(logits(model), ref)
    fresh = packable_llama(seed=3)
    load_quantized_(fresh, tmp_path, meta)
    assert torch.equal(logits(fresh), ref)


@pytest.mark.parametrize("width", [8, 4])
def test_uniform_export_loads_with_plain_transformers_and_skip_list_has_no_prefix_trap(tmp_path, width):
    from transformers import AutoModelForCausalLM

    model = packable_llama(n_layers=12)
    # Layer 1 stays full precision; layers 10 and 11 are quantized: "model.layers.1." would catch them.
    quantize_(model, {f"L{i}": width for i in range(12) if i != 1})
    logits(model)
    meta = save_quantized(model, tmp_path)
    assert meta["loader"] == "transformers"
    skip = meta["quantization_config"]["llm_int8_skip_modules"]
    assert "lm_head" in skip and "model.layers.1.mlp.down_proj" in skip
    assert not any(s.startswith("model.layers.10.") for s in skip)
    assert _skip_entry_matches("model.layers.1.", "model.layers.10.mlp.up_proj")  # the trap, as documented
    model.config.quantization_config = meta["quantization_config"]
    model.config.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert quantized_modules(reloaded) == quantized_modules(model)
    assert torch.equal(logits(reloaded), logits(model))


def test_skip_list_rejects_a_trap_it_would_create():
    model = packable_llama(n_layers=12)
    quantize_(model, {"L10": 8})
    skip = hf_skip_modules(model, {"model.layers.10.mlp.up_proj"})
    assert "model.layers.1.mlp.up_proj" in skip
    assert not any(_skip_entry_matches(e, "model.layers.10.mlp.up_proj") for e in skip)


def test_mixed_widths_need_mi_opt_loader(tmp_path):
    model = packable_llama()
    quantize_(model, {"L0": 4, "L1": 8})
    assert save_quantized(model, tmp_path)["loader"] == "mi_opt"


@pytest.mark.parametrize("bits,match", [
    ({"L9": 4}, "layers 0..3"),
    ({"L0.self_attn.qq_proj": 4}, "matches no linear"),
    ({"layer0": 4}, "unknown bits target"),
    ({"L0": 2}, "widths must be one of"),
    ({"embed": 8}, "cannot quantize token embeddings"),
])
def test_bad_targets_raise_and_change_nothing(bits, match):
    model = packable_llama()
    with pytest.raises(MiOptError, match=match):
        quantize_(model, {"L1": 4, **bits})
    assert quantized_modules(model) == {}


def test_bad_quant_type():
    with pytest.raises(MiOptError, match="quant_type"):
        quantize_(packable_llama(), {"L0": 4}, quant_type="int4")


def test_tied_lm_head_stays_16_bit_unless_untied(tmp_path):
    model = packable_llama(tie=True)
    with pytest.raises(MiOptError, match="tied"):
        quantize_(model, {"lm_head": 8})
    assert quantize_(model, {"lm_head": 16, "embed": 16}) == {}
    ref = logits(model)
    untie_lm_head_(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(logits(model), ref)
    assert quantize_(model, {"lm_head": 8}) == {"lm_head": 8}
    meta = save_quantized(model, tmp_path)
    assert meta["loader"] == "mi_opt"  # transformers keeps lm_head unquantized
    fresh = packable_llama(tie=False, seed=5)
    load_quantized_(fresh, tmp_path, meta)
    assert torch.equal(logits(fresh), logits(model))


def test_tied_weights_saved_once_and_reloaded(tmp_path):
    model = packable_llama(tie=True)
    quantize_(model, {"L0": 4})
    meta = save_quantized(model, tmp_path)
    assert meta["tied_not_saved"] == ["lm_head.weight"]
    fresh = packable_llama(tie=True, seed=4)
    load_quantized_(fresh, tmp_path, meta)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(logits(fresh), logits(model))


def test_gpt2_conv1d_converted_to_linear(tmp_path):
    model = tiny_model("gpt2")
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).logits
    applied = quantize_(model, {"L0": 8, "L1.mlp.c_fc": 8})
    assert set(applied) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                            "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc"}
    with torch.inference_mode():
        out = model(ids).logits
    assert rel_err(out, ref) < 0.05
    meta = save_quantized(model, tmp_path)
    assert meta["loader"] == "mi_opt"
    fresh = tiny_model("gpt2", seed=1)
    load_quantized_(fresh, tmp_path, meta)
    with torch.inference_mode():
        assert torch.equal(fresh(ids).logits, out)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("width", [8, 4])
def test_every_family_runs_and_round_trips(tmp_path, family, width):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).logits
    assert quantize_(model, {"L0": width, "L2": width})
    with torch.inference_mode():
        out = model(ids).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    meta = save_quantized(model, tmp_path)
    fresh = tiny_model(family, seed=1)
    load_quantized_(fresh, tmp_path, meta)
    with torch.inference_mode():
        assert torch.equal(fresh(ids).logits, out)


def test_load_into_a_model_of_other_shape_is_an_error(tmp_path):
    model = packable_llama()
    quantize_(model, {"L3": 8})
    meta = save_quantized(model, tmp_path)
    with pytest.raises(MiOptError, match="does not exist in the given model"):
        load_quantized_(packable_llama(n_layers=2), tmp_path, meta)
    with pytest.raises(MiOptError, match="does not exist"):
        load_quantized_(packable_llama(), tmp_path / "nowhere", meta)


def test_safe_module_class_used():
    model = packable_llama()
    quantize_(model, {"L0.mlp.up_proj": 4})
    assert type(model.model.layers[0].mlp.up_proj) is SafeLinear4bit


@pytest.mark.integration
def test_smollm2_round_trip_and_tied_rule(smollm2, tmp_path):
    model, tok = smollm2
    with pytest.raises(MiOptError, match="tied"):
        quantize_(model, {"lm_head": 4})
    work = copy.deepcopy(model)
    quantize_(work, {"L0": 4, "L5": 8, "L29.mlp.down_proj": 4})
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ref, out = model(ids).logits, work(ids).logits
    assert rel_err(out, ref) < 0.3  # layer 0 at 4 bits is among the most sensitive
    meta = save_quantized(work, tmp_path)
    del work
    fresh = copy.deepcopy(model)
    load_quantized_(fresh, tmp_path, meta)
    with torch.inference_mode():
        assert torch.equal(fresh(ids).logits, out)
