import pytest
import torch
from tiny import save_tiny, tiny_model

from mi_opt.errors import MiOptError
from mi_opt.models import BUNDLED, cache_dir, list_models, load_model


def test_load_local_folder_matches_saved_model(tmp_path):
    save_tiny(tmp_path / "m")
    model, tok = load_model(str(tmp_path / "m"))
    ids = torch.randint(0, 500, (1, 10))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tiny_model("llama")(ids).logits, atol=1e-5)
    assert not model.training and tok.pad_token is not None


def test_dtype_is_honoured(tmp_path):
    save_tiny(tmp_path / "m")
    model, _ = load_model(str(tmp_path / "m"), dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("MI_OPT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    assert all(r["cache_path"].startswith(str(tmp_path)) for r in list_models())
    assert "smollm2-135m" in BUNDLED


@pytest.mark.parametrize("spec,match", [
    ("smollm-9000", "unknown model name 'smollm-9000'; bundled names are smollm2-135m"),
    ("./no/such/folder", "does not exist"),
    ("/tmp/definitely-missing.gguf", "GGUF file .* does not exist"),
])
def test_bad_model_specs(spec, match):
    with pytest.raises(MiOptError, match=match):
        load_model(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(MiOptError, match="has no config.json"):
        load_model(str(tmp_path))


def test_bad_dtype_and_missing_cuda(tmp_path):
    save_tiny(tmp_path / "m")
    with pytest.raises(MiOptError, match="unknown dtype"):
        load_model(str(tmp_path / "m"), dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(MiOptError, match="CUDA is not available"):
            load_model(str(tmp_path / "m"), device="cuda")


def test_unsupported_architecture_folder(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                             num_attention_heads=2, word_embed_proj_dim=16)).save_pretrained(tmp_path / "opt")
    from tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "opt")
    with pytest.raises(MiOptError, match="unsupported architecture 'opt'"):
        load_model(str(tmp_path / "opt"))


def test_a_model_folder_with_custom_code_runs_nothing(tmp_path, monkeypatch):
    import json

    folder = save_tiny(tmp_path / "evil")
    ran = tmp_path / "RAN_CUSTOM_CODE"
    (folder / "evil.py").write_text(f"open({str(ran)!r}, 'w').close()\n"
                                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                    "class EvilConfig(LlamaConfig):\n    model_type = 'mi_opt_evil'\n"
                                    "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mi_opt_evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                                      "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda *a: "y")  # a user who answers yes on a terminal
    with pytest.raises(MiOptError, match="needs its own Python code.*--trust-remote-code"):
        load_model(str(folder))
    assert not ran.exists()
