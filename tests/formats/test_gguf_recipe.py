"""`export: {format: gguf}` in a recipe: checked at load time, and `mi-opt run` evaluates and ships
the GGUF-quantized weights."""
from __future__ import annotations

import json

import gguf
import pytest
import torch
from gguf_vocab import save_vocab_gguf
from tiny import save_tiny, tiny_tokenizer

from mi_opt.errors import MiOptError
from mi_opt.recipe import recipe_from_dict
from mi_opt.run import run


def _recipe(folder, export, heal=None):
    data = {"name": "g", "model": {"name": folder},
            "data": {"calibration": "kjv", "n_samples": 4, "seq_len": 16},
            "profile": {"scorer": "ablation", "options": {"unit_kinds": ["layer"], "batch_size": 2}},
            "policy": {"planner": "bits", "options": {"widths": [4, 8], "avg_bits": 6.0, "granularity": "layer"}},
            "evaluate": {"parts": ["perplexity"], "ppl_samples": 2, "ppl_seq_len": 16},
            "export": export}
    if heal is not None:
        data["heal"] = heal
    return recipe_from_dict(data)


@pytest.mark.parametrize("export, heal, match", [
    ({"format": "onnx"}, None, "not an export format"),
    ({"format": "gguf", "gguf": {"float": "F16"}}, None, "unknown key export.gguf.float"),
    ({"format": "gguf", "gguf": {"types": {4: "Q4_K"}}}, None, "cannot be written"),
    ({"gguf": {"float_type": "BF16"}}, None, "format is not gguf"),
    ({"format": "gguf"}, {}, "heal with export.format gguf"),
])
def test_bad_gguf_export_sections_are_refused_at_load_time(export, heal, match):
    with pytest.raises(MiOptError, match=match):
        _recipe("smollm2-135m", export, heal)


def test_a_gguf_run_evaluates_and_ships_the_gguf_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = str(save_tiny(tmp_path / "tiny"))
    with pytest.raises(MiOptError, match="--vocab-only"):  # refused before any stage runs
        run(_recipe(folder, {"format": "gguf"}), tmp_path / "out" / "g", progress=False)
    assert not (tmp_path / "out" / "g").exists()
    vocab = save_vocab_gguf(tmp_path / "vocab.gguf", tiny_tokenizer())
    result = run(_recipe(folder, {"format": "gguf", "gguf": {"vocab_from": vocab, "types": {4: "Q4_1"}}}),
                 tmp_path / "out" / "g", progress=False)
    assert "export" in result.stages_run
    report = (tmp_path / "out" / "g" / "report.md").read_text()
    assert "4-bit (GGUF Q4_1)" in report and "nf4" not in report
    ckpt = tmp_path / "out" / "g" / "checkpoint"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(ckpt / "model.gguf").tensors}
    plan = json.loads((tmp_path / "out" / "g" / "plan.json").read_text())
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(4)} == {"Q4_1", "Q8_0"}
    assert {4, 8} <= set(plan["bits"].values())
    sidecar = json.loads((ckpt / "mi-opt-compression.json").read_text())
    assert sidecar["verified_max_logit_diff"] <= 1e-4 and "Q4_1" in (ckpt / "README.md").read_text()
    # What was evaluated is what shipped: the file's weights, read back, give the evaluated perplexity.
    from mi_opt.evaluate import evaluate

    recipe = _recipe(folder, {"format": "gguf", "gguf": {"vocab_from": vocab}})
    reread = AutoModelForCausalLM.from_pretrained(ckpt, gguf_file="model.gguf", dtype=torch.float32).eval()
    shipped = evaluate(reread, tiny_tokenizer(), recipe.evaluate, spec="gguf", progress=False).to_dict()
    evaluated = json.loads((tmp_path / "out" / "g" / "eval_compressed.json").read_text())
    assert shipped["perplexity"] == pytest.approx(evaluated["perplexity"], rel=1e-4)
