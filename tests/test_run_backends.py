"""`mi-opt run` on bits recipes with a quantization backend: the plan, the evaluation and the export
all use that backend, and the checkpoint loads in its runtime."""
from __future__ import annotations

import json

import pytest
import torch
from tiny import save_tiny, tiny_tokenizer

from mi_opt.recipe import recipe_from_dict
from mi_opt.run import run


def _recipe(folder, options, export=None):
    return recipe_from_dict({
        "name": "b", "model": {"name": folder},
        "data": {"calibration": "kjv", "n_samples": 4, "seq_len": 16},
        "profile": {"scorer": "ablation", "options": {"unit_kinds": ["layer"], "batch_size": 2}},
        "policy": {"planner": "bits", "options": {"granularity": "layer", **options}},
        "evaluate": {"parts": ["perplexity"], "ppl_samples": 2, "ppl_seq_len": 16},
        "export": export or {"enabled": True}})


def test_a_torchao_run_ships_a_checkpoint_transformers_reloads(tmp_path):
    pytest.importorskip("torchao")
    from transformers import AutoModelForCausalLM

    folder = str(save_tiny(tmp_path / "tiny"))
    recipe = _recipe(folder, {"widths": [8, 16], "avg_bits": 8.0, "backend": "torchao"})
    result = run(recipe, tmp_path / "out", progress=False)
    assert "export" in result.stages_run
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["backend"] == "torchao" and set(plan["bits"][f"L{i}"] for i in range(4)) == {8}
    ckpt = tmp_path / "out" / "checkpoint"
    sidecar = json.loads((ckpt / "mi-opt-compression.json").read_text())
    assert sidecar["loader"] == "transformers" and sidecar["quantization"]["backend"] == "torchao"
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    ids = tiny_tokenizer()("In the beginning", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_a_gguf_backend_run_measures_with_gguf_and_ships_the_file(tmp_path):
    import gguf
    from gguf_vocab import save_vocab_gguf
    from transformers import AutoModelForCausalLM

    from mi_opt.errors import MiOptError

    folder = str(save_tiny(tmp_path / "tiny"))
    vocab = save_vocab_gguf(tmp_path / "vocab.gguf", tiny_tokenizer())
    options = {"widths": [4, 8], "avg_bits": 6.0, "backend": "gguf", "quant_type": "Q4_1"}
    with pytest.raises(MiOptError, match="policy quant_type Q4_1 .* writes 4-bit as Q4_0"):
        _recipe(folder, options, {"format": "gguf", "gguf": {"vocab_from": vocab}})
    with pytest.raises(MiOptError, match="policy backend gguf is shipped as export.format gguf"):
        _recipe(folder, options)
    recipe = _recipe(folder, options, {"format": "gguf", "gguf": {"vocab_from": vocab, "types": {4: "Q4_1"}}})
    run(recipe, tmp_path / "out", progress=False)
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["backend"] == "gguf" and plan["planner"]["sensitivity"]["backend"] == "gguf"
    ckpt = tmp_path / "out" / "checkpoint"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(ckpt / "model.gguf").tensors}
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(4)} <= {"Q4_1", "Q8_0"}
    model = AutoModelForCausalLM.from_pretrained(ckpt, gguf_file="model.gguf", dtype=torch.float32)
    ids = tiny_tokenizer()("In the beginning", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
