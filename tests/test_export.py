"""Exports reload where promised with the same logits, atomically, or fail leaving nothing."""
from __future__ import annotations

import json

import pytest
import torch
from tiny import FAMILIES, tiny_model, tiny_tokenizer, tiny_windows

from mi_opt.artifacts import model_fingerprint
from mi_opt.errors import MiOptError
from mi_opt.export import SIDECAR, export, load_compressed, reference_logits, stored_parameters
from mi_opt.plan import CompressionPlan
from mi_opt.surgery import apply_


def _plan(model, **kw) -> CompressionPlan:
    return CompressionPlan(model={"spec": "tiny", "fingerprint": model_fingerprint(model), "n_layers": 4},
                           predicted={"parameters_before": sum(p.numel() for p in model.parameters())}, **kw)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _stored_logits(model, ids, dtype=torch.bfloat16):
    """What a default export computes in fp32: the model with its unquantized weights rounded to bf16."""
    return reference_logits(model, ids, stored_parameters(model, dtype))


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_uniform_export_loads_with_plain_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_model(family, attn_implementation="sdpa")
    n_kv = model.config.num_key_value_heads
    prune = {i: [1, 3] for i in range(4)} if n_kv == 2 else {i: [0, 1] for i in range(4)}
    plan = _plan(model, drop_layers=[2], prune_heads=prune, head_mode="uniform")
    apply_(model, plan)
    out = export(model, tiny_tokenizer(), plan, tmp_path / "out", eval_results={"perplexity": 12.5})
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["loader"] == "transformers" and sidecar["verified_max_logit_diff"] <= 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 3 and reloaded.config.num_attention_heads == 2
    assert next(reloaded.parameters()).dtype == torch.bfloat16 and sidecar["dtype"] == "bfloat16"
    ids = tiny_windows(2, 12)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _stored_logits(model, ids), atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(out).eos_token == "<eos>"
    assert CompressionPlan.load(out / "plan.json").drop_layers == [2]
    card = (out / "README.md").read_text()
    assert "Removed 1 of 4 decoder layers" in card and "12.5" in card and "from_pretrained" in card
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("family", FAMILIES)
def test_free_export_loads_with_load_compressed_and_generates(family, tmp_path):
    model = tiny_model(family, attn_implementation="sdpa")
    plan = _plan(model, drop_layers=[1], prune_heads={0: [0], 2: [1, 2], 3: [3]}, head_mode="free")
    apply_(model, plan)
    out = export(model, None, plan, tmp_path / "free")
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["loader"] == "mi_opt" and sidecar["heads"][0][0] == 3
    assert next(load_compressed(out).parameters()).dtype == torch.bfloat16
    reloaded = load_compressed(out, dtype="fp32")
    ids = tiny_windows(2, 12)
    torch.testing.assert_close(_logits(reloaded, ids), _stored_logits(model, ids), atol=1e-5, rtol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for name, weight in stored_parameters(model, torch.bfloat16).items():
            model.get_parameter(name).copy_(weight)  # now it computes with exactly the stored weights
        assert torch.equal(reloaded.generate(ids[:1, :5], **kw), model.generate(ids[:1, :5], **kw))
    assert "load_compressed" in (out / "README.md").read_text()


def test_existing_folder_is_kept_unless_forced(tmp_path):
    model = tiny_model("llama")
    plan = _plan(model, drop_layers=[1])
    apply_(model, plan)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MiOptError, match="already exists"):
        export(model, None, plan, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export(model, None, plan, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert _leftovers(tmp_path, "out") == []


def test_a_reload_mismatch_fails_loudly_and_writes_nothing(tmp_path):
    model = tiny_model("llama")
    plan = _plan(model)
    apply_(model, plan)
    # An in-memory change no checkpoint records: the reloaded model computes differently.
    model.model.layers[1].self_attn.scaling *= 2
    with pytest.raises(MiOptError, match="export check failed"):
        export(model, None, plan, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_model_the_plan_was_not_applied_to(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(MiOptError, match="apply_"):
        export(model, None, _plan(model, drop_layers=[0]), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_profile_is_exported_alongside(tmp_path):
    from mi_opt.profile.ablation import AblationConfig, profile_ablation
    from mi_opt.profile.importance import ImportanceProfile

    model = tiny_model("gpt2")
    profile = profile_ablation(model, tiny_windows(2, 8), AblationConfig(unit_kinds=("layer",)), progress=False)
    plan = _plan(model, drop_layers=[3])
    apply_(model, plan)
    out = export(model, None, plan, tmp_path / "p", profile=profile)
    assert ImportanceProfile.load(out / "profile.json").scores.keys() == profile.scores.keys()
    # Layer-dropped GPT-2 keeps its head geometry, so plain transformers loads it.
    assert json.loads((out / SIDECAR).read_text())["loader"] == "transformers"


@pytest.mark.parametrize("bits", [{}, {"L0": 8, "L2": 4, "L3": 4}])
def test_tied_embeddings_survive_load_compressed(bits, tmp_path):
    """SmolLM2 ties lm_head to the embedding; the loader must re-tie after loading (it is not saved)."""
    from tiny import _config
    from transformers import AutoModelForCausalLM

    config = _config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    plan = _plan(model, drop_layers=[1], prune_heads={0: [1], 2: [0, 3]}, head_mode="free", bits=bits)
    apply_(model, plan)
    out = export(model, None, plan, tmp_path / "tied")
    reloaded = load_compressed(out, dtype="fp32")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = tiny_windows(2, 12)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids).logits, _stored_logits(model, ids), atol=1e-5, rtol=1e-5)


def test_unquantized_weights_are_stored_in_bf16_unless_asked_otherwise(tmp_path):
    from safetensors import safe_open

    model = tiny_model("llama")
    plan = _plan(model)
    small, full = export(model, None, plan, tmp_path / "bf16"), export(model, None, plan, tmp_path / "fp32", dtype="fp32")
    with safe_open(str(small / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert (small / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    ids = tiny_windows(2, 12)
    torch.testing.assert_close(_logits(load_compressed(full), ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    # the in-memory model is unchanged by a bf16 export
    assert next(model.parameters()).dtype == torch.float32


def test_exports_follow_the_umask_not_mkdtemp(tmp_path):
    import os

    model = tiny_model()
    before = os.umask(0o022)
    try:
        out = export(model, tiny_tokenizer(), _plan(model), tmp_path / "ckpt")
    finally:
        os.umask(before)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}[SIDECAR] == 0o644
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir() if p.is_file())
