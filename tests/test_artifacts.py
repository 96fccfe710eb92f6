import pytest
import torch
from tiny import save_tiny, tiny_model, tiny_tokenizer

from mi_opt.artifacts import model_fingerprint


def test_a_change_anywhere_in_a_weight_changes_the_fingerprint():
    model = tiny_model()
    before = model_fingerprint(model)
    weight = model.model.layers[2].mlp.down_proj.weight
    assert weight.numel() > 256
    with torch.no_grad():
        weight.view(-1)[-1] += 1e-3  # past any sample of the first values
    assert model_fingerprint(model) != before


def test_a_buffer_or_tied_weight_change_is_seen_and_same_weights_agree():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.norm.weight[-1] = 2.0
    assert model_fingerprint(a) != model_fingerprint(b)


def test_bf16_weights_are_hashed_byte_for_byte():
    model = tiny_model().to(torch.bfloat16)
    before = model_fingerprint(model)
    assert before != model_fingerprint(tiny_model())
    with torch.no_grad():
        model.lm_head.weight.view(-1)[-1] += 1.0
    assert model_fingerprint(model) != before


def test_the_config_counts_but_not_where_the_model_was_loaded_from(tmp_path):
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "a"))
    b = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "b"))
    b.config.use_cache = not b.config.use_cache
    assert model_fingerprint(a) == model_fingerprint(b)
    b.config.rms_norm_eps = 1e-3  # changes what the model computes
    assert model_fingerprint(a) != model_fingerprint(b)


def test_the_tokenizer_counts_when_given():
    model, tok = tiny_model(), tiny_tokenizer()
    assert model_fingerprint(model, tok) != model_fingerprint(model)
    assert model_fingerprint(model, tok) == model_fingerprint(model, tiny_tokenizer())
    tok.add_tokens(["<extra>"])
    assert model_fingerprint(model, tok) != model_fingerprint(model, tiny_tokenizer())


@pytest.mark.parametrize("payload,where", [
    ({"scores": {"L3": {"delta_loss": float("nan")}}}, "scores.L3.delta_loss"),
    ({"speed": [1.0, float("inf")]}, "speed.1"),
])
def test_write_json_refuses_nan_and_infinity(tmp_path, payload, where):
    from mi_opt.artifacts import write_json
    from mi_opt.errors import MiOptError

    with pytest.raises(MiOptError, match=f"refusing to write .*: {where} .* is not a finite number"):
        write_json(tmp_path / "a.json", payload)
    assert not list(tmp_path.iterdir())  # neither the file nor a temporary one
