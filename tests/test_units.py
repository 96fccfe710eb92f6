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
