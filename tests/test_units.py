import pytest
from tiny import tiny_model

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.units import Unit, enumerate_units, parse_unit


def test_keys_round_trip():
    for key in ("L0", "L12.attn", "L3.mlp", "L7.H5", "L2.KV1"):
        assert parse_unit(key).key == key
    assert parse_unit("L7.H5") == Unit(7, "head", 5)


def test_bad_key():
    with pytest.raises(MiOptError, match="bad unit key"):
        parse_unit("layer7")


def test_enumerate_counts_gqa_groups():
    adapter = get_adapter(tiny_model("llama"))  # 4 layers, 4 heads, 2 KV heads
    units = enumerate_units(adapter)
    assert len(units) == 4 * (1 + 1 + 1 + 4 + 2)
    gpt2 = enumerate_units(get_adapter(tiny_model("gpt2")))
    assert not any(u.kind == "kv_group" for u in gpt2)  # no GQA: groups would duplicate heads
    with pytest.raises(MiOptError, match="unknown unit kind"):
        enumerate_units(adapter, ("neuron",))


def test_module_keys_and_layers():
    from mi_opt.units import BadKey, ModuleKey, in_layers, key_order, layer_of, parse_module_key

    assert parse_module_key("L3.self_attn.q_proj") == ModuleKey(3, "self_attn.q_proj")
    assert parse_module_key("L3").path is None and parse_module_key("lm_head").special == "lm_head"
    for key in ("L3", "L3.mlp.down_proj", "embed", "lm_head"):
        assert parse_module_key(key).key == key
    assert layer_of("L7.H2") == layer_of("L7.mlp.up_proj") == 7 and layer_of("embed") is None
    assert in_layers("L2.mlp", {2}) and not in_layers("lm_head", {2})
    assert sorted(["L10", "L2.mlp", "embed"], key=key_order) == ["embed", "L2.mlp", "L10"]
    for bad, match in (("layer1", "unknown bits target"), ("L1..x", "unknown bits target")):
        with pytest.raises(BadKey, match=match):
            parse_module_key(bad)
    with pytest.raises(BadKey, match="bad unit or module key"):
        layer_of("x3")


def test_resolve_linears_per_family():
    from mi_opt.units import resolve_linears, resolve_unit

    llama = get_adapter(tiny_model("llama"))
    assert set(resolve_linears(llama, "L1.self_attn")) == {f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"}
    assert resolve_linears(llama, "L1.input_layernorm") == {}  # a module, but no linear under it
    with pytest.raises(MiOptError, match="no module 'mlp.gate'"):
        resolve_linears(llama, "L1.mlp.gate")
    with pytest.raises(MiOptError, match="layers 0..3"):
        resolve_linears(llama, "L9")
    gpt2 = get_adapter(tiny_model("gpt2"))
    assert "transformer.h.0.attn.c_attn" in resolve_linears(gpt2, "L0")  # Conv1D counts as a linear
    assert resolve_unit(gpt2, parse_unit("L0.H1")) is gpt2.attention(gpt2.layers()[0])
