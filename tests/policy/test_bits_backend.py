"""The bit planner's matched intervention: sensitivity measured with the plan's own quantization
backend, recorded with its name and version, and refused for a plan made for another backend."""
from __future__ import annotations

import pytest
from tiny import tiny_model, tiny_windows

from mi_opt.errors import MiOptError
from mi_opt.policy import make_plan
from mi_opt.policy.bits import BitsConfig
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.profile.quant_sensitivity import QuantSensitivity, measure_quant_sensitivity
from mi_opt.quant import get_backend
from mi_opt.surgery import apply_

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def planned():
    model = tiny_model("llama")
    windows = tiny_windows(4, 16)
    profile = profile_ablation(model, windows, AblationConfig(unit_kinds=("layer",)), progress=False)
    return model, windows, profile


def test_sensitivity_is_measured_and_recorded_with_the_backend(planned):
    model, windows, _ = planned
    ao = measure_quant_sensitivity(model, windows, widths=(8,), granularity="layer", backend="torchao", progress=False)
    assert ao.backend == "torchao" and ao.method["backend_version"] == get_backend("torchao").version()
    assert ao.method["quant_type"] is None and "with torchao" in ao.method["intervention"]
    bnb = measure_quant_sensitivity(model, windows, widths=(8,), granularity="layer", progress=False)
    assert bnb.backend == "bitsandbytes" and bnb.method["quant_type"] == "nf4"
    # weight-only int8 rounds no activations: less damage than LLM.int8 on every layer
    assert all(ao.scores[k]["8"]["kl"] < bnb.scores[k]["8"]["kl"] for k in ao.scores)
    with pytest.raises(MiOptError, match="does not offer: torchao 0.18's int4"):
        measure_quant_sensitivity(model, windows, widths=(4, 8), backend="torchao", progress=False)
    gguf = measure_quant_sensitivity(model, windows, widths=(4,), granularity="layer", backend="gguf",
                                     progress=False)
    assert gguf.method["quant_type"] == "Q4_0"
    assert gguf.sizes["L0"]["bytes"]["4"] == sum(-(-n // 32) * 18 for n in (32 * 32, 16 * 32, 16 * 32, 32 * 32,
                                                                           64 * 32, 64 * 32, 32 * 64))


def test_files_from_before_the_field_were_bitsandbytes(planned, tmp_path):
    model, windows, _ = planned
    sens = measure_quant_sensitivity(model, windows, widths=(8,), granularity="layer", progress=False)
    d = sens.to_dict()
    del d["method"]["backend"]
    assert QuantSensitivity.from_dict(d).backend == "bitsandbytes"


def test_planner_plans_torchao_int8_and_refuses_another_backends_sensitivity(planned, tmp_path):
    model, windows, profile = planned
    plan = make_plan(profile, "bits", {"avg_bits": 8, "widths": (8, 16), "backend": "torchao"}, model, windows,
                     progress=False)
    assert plan.backend == "torchao" and plan.quant_type is None
    assert {w for k, w in plan.bits.items() if k.startswith("L")} == {8}
    assert plan.planner["sensitivity"]["backend"] == "torchao"
    work = apply_(tiny_model("llama"), plan)
    assert type(work.model.layers[0].mlp.down_proj.weight).__name__ == "Int8Tensor"

    path = measure_quant_sensitivity(model, windows, widths=(8,), progress=False).save(tmp_path / "bnb.json")
    with pytest.raises(MiOptError, match="measured with quantization backend bitsandbytes .* plans for torchao"):
        make_plan(profile, "bits", {"avg_bits": 8, "widths": (8, 16), "backend": "torchao", "sensitivity": str(path)},
                  model, progress=False)


def test_config_refuses_widths_and_formats_the_backend_lacks():
    with pytest.raises(MiOptError, match="widths asks for 4-bit weights, which quantization backend torchao"):
        BitsConfig(avg_bits=6, backend="torchao")
    with pytest.raises(MiOptError, match="torchao has no 4-bit format 'nf4'"):
        BitsConfig(avg_bits=8, widths=(8, 16), backend="torchao", quant_type="nf4")
    assert BitsConfig(avg_bits=6, backend="gguf").quant_type == "Q4_0"
    assert BitsConfig(avg_bits=6).quant_type == "nf4"
    with pytest.raises(MiOptError, match="unknown quantization backend"):
        BitsConfig(avg_bits=6, backend="hqq")


def test_gguf_offers_five_bits_measured_as_q5_0_and_other_backends_refuse_it(planned, tmp_path):
    import gguf

    from mi_opt.export import export
    from mi_opt.formats.gguf_types import GgufOptions

    model, windows, profile = planned
    sens = measure_quant_sensitivity(model, windows, widths=(4, 5, 8), backend="gguf", progress=False)
    blocks = -(-64 * 32 // 32)
    assert sens.sizes["L0.mlp.down_proj"]["bytes"]["5"] == blocks * 22  # Q5_0: 22 bytes per 32 weights
    # each extra bit halves the rounding step: less damage at 5 than at 4, more than at 8, summed over modules
    total = {w: sum(per[str(w)]["kl"] for per in sens.scores.values()) for w in (4, 5, 8)}
    assert total[8] < total[5] < total[4]
    path = sens.save(tmp_path / "gguf.json")
    plan = make_plan(profile, "bits", {"avg_bits": 5.5, "widths": (4, 5, 8), "backend": "gguf",
                                       "sensitivity": str(path)}, model, progress=False)
    assert 5 in set(plan.bits.values()) and plan.predicted["counts"]["5"] > 0
    from mi_opt.formats.gguf import apply_structure_

    out = export(apply_structure_(tiny_model("llama"), plan), None, plan, tmp_path / "g", format="gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    five = next(k for k, w in plan.bits.items() if w == 5)
    layer, _, path_ = five.partition(".")
    gguf_name = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}[path_]
    assert types[f"blk.{layer[1:]}.{gguf_name}.weight"] == "Q5_0"
    with pytest.raises(MiOptError, match="5-bit modules were measured as Q5_0, but the GGUF export would write Q5_1"):
        export(apply_structure_(tiny_model("llama"), plan), None, plan, tmp_path / "h", format="gguf",
               gguf=GgufOptions(types={5: "Q5_1"}))
    assert not (tmp_path / "h").exists()
    for backend in ("bitsandbytes", "torchao"):
        with pytest.raises(MiOptError, match=f"asks for 5-bit weights, which quantization backend {backend}"):
            BitsConfig(avg_bits=6, widths=(5, 8, 16), backend=backend)
