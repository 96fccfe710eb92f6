"""GGUF export of a neuron-pruned Llama: one smaller feed_forward_length that transformers reads
back to the verified logits; per-layer MLP sizes refused before anything is written."""
from __future__ import annotations

import gguf
import pytest
import torch
from tiny import tiny_model, tiny_windows

from mi_opt.artifacts import model_fingerprint
from mi_opt.errors import MiOptError
from mi_opt.export import export, reference_logits
from mi_opt.formats.gguf import apply_structure_
from mi_opt.formats.gguf_families import check_plan_mlp_sizes
from mi_opt.formats.gguf_types import GgufOptions
from mi_opt.plan import CompressionPlan


def _plan(model, **kw) -> CompressionPlan:
    return CompressionPlan(model={"spec": "tiny", "fingerprint": model_fingerprint(model), "n_layers": 4},
                           predicted={}, **kw)


def test_uniform_neurons_write_one_feed_forward_length_that_transformers_reads_back(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    # 32 of 64 neurons in each kept layer: down_proj rows of 32 values, one Q8_0 block
    plan = _plan(model, drop_layers=[1], prune_neurons={i: list(range(1, 64, 2)) for i in (0, 2, 3)},
                 neuron_mode="uniform", bits={"L0": 8})
    apply_structure_(model, plan)
    out = export(model, None, plan, tmp_path / "g", format="gguf", gguf=GgufOptions())
    fields = gguf.GGUFReader(out / "model.gguf").fields
    assert fields["llama.feed_forward_length"].contents() == 32 and fields["llama.block_count"].contents() == 3
    reread = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    assert reread.config.intermediate_size == 32 and reread.model.layers[0].mlp.down_proj.in_features == 32
    names = dict(model.named_parameters())
    dequantized = {k: v for k, v in reread.state_dict().items() if k in names}
    ids = tiny_windows(2, 12)
    with torch.inference_mode():
        torch.testing.assert_close(reread(ids).logits, reference_logits(model, ids, dequantized),
                                   atol=1e-5, rtol=1e-5)
    assert "Removed 96 MLP neurons in 3 layers (uniform mode)" in (out / "README.md").read_text()


def test_per_layer_mlp_sizes_are_refused_before_anything_is_written(tmp_path):
    model = tiny_model("llama")
    plan = _plan(model, prune_neurons={0: [1, 2], 2: list(range(32))}, neuron_mode="free")
    message = r"MLP sizes differ per layer \(\[62, 64, 32, 64\]\).*neuron_mode 'uniform'.*safetensors export"
    with pytest.raises(MiOptError, match=message):  # asked of the unpruned model, as a run does first
        check_plan_mlp_sizes(model, plan)
    apply_structure_(model, plan)
    with pytest.raises(MiOptError, match=message):
        export(model, None, plan, tmp_path / "x", format="gguf")
    assert list(tmp_path.iterdir()) == []


def test_the_plan_check_skips_dropped_layers():
    model = tiny_model("llama")
    plan = _plan(model, drop_layers=[1], prune_neurons={0: [0], 2: [1], 3: [2]}, neuron_mode="free")
    check_plan_mlp_sizes(model, plan)
    with pytest.raises(MiOptError, match="differ per layer"):
        check_plan_mlp_sizes(model, _plan(model, prune_neurons={0: [0], 2: [1], 3: [2]}, neuron_mode="free"))
