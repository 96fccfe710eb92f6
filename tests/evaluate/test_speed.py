import pytest
import torch
from tiny import tiny_model

from mi_opt.errors import MiOptError
from mi_opt.evaluate.config import SpeedConfig
from mi_opt.evaluate.speed import count_parameters, disk_bytes, measure_speed, memory_bytes


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_speed_figures_are_positive_and_consistent(family):
    model = tiny_model(family)
    config = SpeedConfig(batch_size=2, prompt_len=16, new_tokens=5, warmup=1, repetitions=3)
    s = measure_speed(model, config, progress=False)
    for key in ("prefill_ms", "ttft_ms", "decode_tokens_per_s", "decode_ms_per_token"):
        assert s[key]["n"] == 3
        assert 0 < s[key]["min"] <= s[key]["median"] <= s[key]["max"]
    # tokens/s and ms/token describe the same runs: their medians are reciprocal up to batch
    assert s["decode_tokens_per_s"]["median"] * s["decode_ms_per_token"]["median"] / 1e3 == pytest.approx(2, rel=0.5)
    assert s["peak_memory_bytes"] > s["memory_bytes"] > 0
    assert s["parameters"] == sum(p.numel() for p in model.parameters())
    assert s["size_kind"] == "memory" and s["size_bytes"] == s["memory_bytes"]
    assert s["threads"] == torch.get_num_threads()


def test_repeated_runs_agree_in_order_of_magnitude():
    model = tiny_model("llama")
    config = SpeedConfig(prompt_len=16, new_tokens=4, repetitions=3)
    a, b = (measure_speed(model, config, progress=False)["prefill_ms"]["median"] for _ in range(2))
    assert 0.01 < a / b < 100


def test_memory_bytes_counts_tied_weights_once_and_dtype():
    model = tiny_model("llama")
    fp32 = memory_bytes(model)
    assert fp32 == 4 * (sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()))
    assert memory_bytes(model.to(torch.bfloat16)) == fp32 // 2
    tied = tiny_model("gpt2")  # GPT-2 ties lm_head to the token embedding
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert memory_bytes(tied) < 4 * sum(t.numel() for t in tied.state_dict().values())


def test_bitsandbytes_modules_are_counted_by_their_packed_storage():
    bnb = pytest.importorskip("bitsandbytes")
    # Large enough that fixed metadata (the 4-bit quant state blob) is a small part.
    lin = torch.nn.Linear(256, 128, bias=False)
    q8 = bnb.nn.Linear8bitLt(256, 128, bias=False, has_fp16_weights=False)
    q8.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q4 = bnb.nn.Linear4bit(256, 128, bias=False, quant_type="nf4")
    q4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q8, q4 = q8.to("cpu"), q4.to("cpu")  # quantizes
    for q in (q8, q4):
        q(torch.randn(1, 256))
        assert count_parameters(q) == 256 * 128
    fp32 = memory_bytes(lin)
    assert fp32 // 4 <= memory_bytes(q8) < fp32 // 2            # int8 weights + per-row scales
    assert fp32 // 8 <= memory_bytes(q4) < fp32 // 4            # packed 4-bit + absmax + map


def test_disk_bytes_counts_weight_files_only(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    weights = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert disk_bytes(tmp_path) == weights > memory_bytes(model) * 0.9
    s = measure_speed(model, SpeedConfig(prompt_len=8, new_tokens=2, repetitions=1), folder=tmp_path, progress=False)
    assert s["size_kind"] == "disk" and s["size_bytes"] == weights == s["disk_bytes"]
    # kept LoRA adapters load with the checkpoint: their weights count, nothing else in the folder does
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert disk_bytes(tmp_path) == weights + 100


def test_bad_speed_settings():
    with pytest.raises(MiOptError, match="new_tokens"):
        SpeedConfig(new_tokens=1)
    with pytest.raises(MiOptError, match="repetitions"):
        SpeedConfig(repetitions=0)
    with pytest.raises(MiOptError, match="context"):
        measure_speed(tiny_model("llama"), SpeedConfig(prompt_len=200, new_tokens=2), progress=False)
