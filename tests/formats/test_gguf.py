"""GGUF export: tensor types follow the plan, transformers reads back what was verified, and every
plan GGUF cannot express is refused before anything is written."""
from __future__ import annotations

import json

import gguf
import pytest
import torch
from gguf_vocab import save_vocab_gguf
from tiny import _config, save_tiny, tiny_model, tiny_tokenizer, tiny_windows

from mi_opt.artifacts import model_fingerprint
from mi_opt.errors import MiOptError
from mi_opt.export import SIDECAR, export, reference_logits
from mi_opt.formats.gguf import apply_structure_
from mi_opt.formats.gguf_types import GgufOptions, quantizable_types
from mi_opt.plan import CompressionPlan


def _plan(model, **kw) -> CompressionPlan:
    return CompressionPlan(model={"spec": "tiny", "fingerprint": model_fingerprint(model), "n_layers": 4},
                           predicted={}, **kw)


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _reread(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()


def _dequantized(out, model) -> dict[str, torch.Tensor]:
    """The file's weights in the model's parameter names, as transformers reads them."""
    names = dict(model.named_parameters())
    return {k: v for k, v in _reread(out).state_dict().items() if k in names}


def _tied_llama():
    from transformers import AutoModelForCausalLM

    config = _config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_tensor_types_follow_the_plan_and_transformers_reads_what_was_verified(tmp_path):
    model = tiny_model("llama")
    plan = _plan(model, drop_layers=[1], prune_heads={i: [1, 3] for i in range(4)}, head_mode="uniform",
                 bits={"L0": 8, "L2": 4, "L3": 4, "L3.self_attn.v_proj": 16, "lm_head": 8,
                       # two heads of 8 leave o_proj rows of 16 values: less than one block
                       **{f"L{i}.self_attn.o_proj": 16 for i in (0, 2, 3)}})
    apply_structure_(model, plan)
    out = export(model, None, plan, tmp_path / "g", format="gguf", gguf=GgufOptions(types={4: "Q4_1"}))
    types = _types(out / "model.gguf")
    # original layers 0, 2, 3 are blocks 0, 1, 2 of the file
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.1.attn_k.weight"] == types["blk.2.ffn_up.weight"] == "Q4_1"
    assert types["blk.2.attn_v.weight"] == "F16" and types["blk.2.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "F16" and types["output.weight"] == "Q8_0"
    assert not any(name.startswith("blk.3.") for name in types)
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["verified_max_logit_diff"] <= 1e-4 and sidecar["gguf"]["bits_to_ggml"]["4"] == "Q4_1"
    reread = _reread(out)
    assert reread.config.num_hidden_layers == 3 and reread.config.num_attention_heads == 2
    ids = tiny_windows(2, 12)
    want = reference_logits(model, ids, _dequantized(out, model))
    with torch.inference_mode():
        torch.testing.assert_close(reread(ids).logits, want, atol=1e-5, rtol=1e-5)
        # quantized for real: the file is not the float model
        assert (reread(ids).logits - model(ids).logits).abs().max() > 1e-3
    card = (out / "README.md").read_text()
    assert "4 bit -> Q4_1" in card and "llama-cli -m model.gguf" in card and "Removed 1 of 4" in card
    assert [p.name for p in tmp_path.iterdir()] == ["g"]


def test_the_writer_offers_what_gguf_can_quantize_and_refuses_the_rest(tmp_path):
    can = quantizable_types()
    assert {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"} <= set(can) and "Q4_K" not in can
    model = tiny_model("llama")
    plan = _plan(model, bits={"L0": 4})
    with pytest.raises(MiOptError, match="Q4_K .*cannot be written"):
        export(model, None, plan, tmp_path / "k", format="gguf", gguf=GgufOptions(types={4: "Q4_K"}))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["free_heads", "gemma3", "bnb_model", "blocks", "tied_disagree", "tokenizer"])
def test_what_gguf_cannot_express_is_refused_before_anything_is_written(case, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, kw = tiny_model("llama"), None, {}
    if case == "free_heads":
        kw = dict(prune_heads={0: [0], 2: [1, 2]}, head_mode="free")
        match = "head counts differ per layer"
    elif case == "gemma3":
        model, kw, match = tiny_model("gemma3"), dict(drop_layers=[3]), "sliding-window"
    elif case == "bnb_model":
        kw, match = dict(bits={"L0": 8}), "bitsandbytes modules"
    elif case == "blocks":
        config = _config("llama")
        config.intermediate_size = 48  # down_proj rows of 48 values: not whole blocks of 32
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        kw, match = dict(bits={"L1.mlp.down_proj": 4}), "do not split into Q4_0's blocks of 32"
    elif case == "tied_disagree":
        model, kw, match = _tied_llama(), dict(bits={"embed": 8, "lm_head": 4}), "one tensor"
    else:
        tokenizer, match = tiny_tokenizer(), "convert_hf_to_gguf.py --vocab-only"
    plan = _plan(model, **kw)
    if case == "bnb_model":
        from mi_opt.surgery import apply_

        apply_(model, plan)
    else:
        apply_structure_(model, plan)
    with pytest.raises(MiOptError, match=match):
        export(model, tokenizer, plan, tmp_path / "x", format="gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_tied_embedding_stays_one_tensor(tmp_path):
    model = _tied_llama()
    plan = _plan(model, bits={"L0": 4, "embed": 8})
    apply_structure_(model, plan)
    out = export(model, None, plan, tmp_path / "tied", format="gguf")
    types = _types(out / "model.gguf")
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types  # llama.cpp ties a missing output
    reread = _reread(out)
    assert reread.config.tie_word_embeddings and reread.lm_head.weight is reread.model.embed_tokens.weight


def test_a_wrong_layout_fails_the_check_and_leaves_nothing(tmp_path, monkeypatch):
    import mi_opt.formats.gguf as writer

    model = tiny_model("llama")
    plan = _plan(model, bits={"L0": 8})
    apply_structure_(model, plan)
    # Forget llama.cpp's q/k row order: transformers un-permutes rows that were never permuted.
    monkeypatch.setattr(writer, "permute_rows", lambda w, n: w)
    with pytest.raises(MiOptError, match="GGUF export check failed"):
        export(model, None, plan, tmp_path / "bad", format="gguf")
    assert list(tmp_path.iterdir()) == []


def test_apply_cli_writes_a_gguf_with_the_tokenizer_copied(tmp_path, capsys):
    from transformers import AutoTokenizer

    from mi_opt.cli import main
    from mi_opt.models import load_model

    folder = str(save_tiny(tmp_path / "model"))
    model, tokenizer = load_model(folder)
    plan = _plan(model, drop_layers=[2], bits={"L0": 4, "L1": 8})
    plan.model["spec"] = folder
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    # The folder's tokenizer cannot be named for llama.cpp without its pre-tokenizer: refused, clearly.
    assert main(["apply", folder, str(tmp_path / "plan.json"), "--out", str(out), "--format", "gguf"]) == 2
    assert "--vocab-only" in capsys.readouterr().err and not out.exists()
    vocab = save_vocab_gguf(tmp_path / "vocab.gguf", tokenizer)
    assert main(["apply", folder, str(tmp_path / "plan.json"), "--out", str(out), "--format", "gguf",
                 "--gguf-vocab", vocab, "--gguf-4bit", "Q5_0"]) == 0
    assert "llama-cli -m" in capsys.readouterr().out
    assert _types(out / "model.gguf")["blk.0.attn_q.weight"] == "Q5_0"
    fields = gguf.GGUFReader(out / "model.gguf").fields
    assert fields["general.license"].contents() == "apache-2.0" and fields["tokenizer.ggml.model"].contents() == "gpt2"
    text = "The handbook says: store the tools."
    assert AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")(text).input_ids == tokenizer(text).input_ids


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_0", "Q8_0"])
def test_an_export_after_apply_gguf_writes_the_evaluated_weights(kind, tmp_path):
    """The run path: evaluate the GGUF-quantized weights, export them, and the file holds the same values."""
    from mi_opt.formats.gguf import apply_gguf_

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, :32] = 0  # an all-zero block: its scale is 0 (or -0)
    plan = _plan(model, bits={f"L{i}": 4 for i in range(4)} | {"L1": 8})
    options = GgufOptions(types={4: kind} if kind != "Q8_0" else {})
    apply_gguf_(model, plan, options)
    evaluated = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = export(model, None, plan, tmp_path / "a", format="gguf", gguf=options)
    assert json.loads((out / SIDECAR).read_text())["verified_max_logit_diff"] == 0
    for name, weight in _dequantized(out, model).items():
        torch.testing.assert_close(weight, evaluated[name], atol=0, rtol=0)
