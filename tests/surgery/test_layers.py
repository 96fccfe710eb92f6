"""Dropping a layer equals skipping it, and the KV cache and saved config stay consistent."""
from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, tiny_model, tiny_windows

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.hooks import Hook, attached
from mi_opt.surgery.layers import drop_layers_


def _skip_logits(model, skip: list[int], ids):
    adapter = get_adapter(model)

    def identity(module, args, kwargs, output):
        inp = args[0] if args else kwargs["hidden_states"]
        return (inp, *output[1:]) if isinstance(output, tuple) else inp
    hooks = [Hook(adapter.layers()[i], identity, with_kwargs=True) for i in skip]
    with torch.no_grad(), attached(hooks):
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_equals_skipping_and_generate_uses_cache(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, attn_implementation="sdpa")
    ids = tiny_windows(2, 12)
    expected = _skip_logits(model, [1, 2], ids)
    old_types = list(getattr(model.config, "layer_types", None) or [])
    drop_layers_(model, [1, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert model.config.num_hidden_layers == 2
    attn_idx = [get_adapter(model).attention(layer).layer_idx for layer in get_adapter(model).layers()]
    assert attn_idx == [0, 1]
    if old_types:
        assert model.config.layer_types == [old_types[0], old_types[3]]

    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids[:1, :6], use_cache=True, **kw)
        uncached = model.generate(ids[:1, :6], use_cache=False, **kw)
    assert torch.equal(cached, uncached)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert get_adapter(reloaded).n_layers() == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_bad_drops_raise_and_change_nothing():
    model = tiny_model("llama")
    with pytest.raises(MiOptError, match="all 4 layers"):
        drop_layers_(model, [0, 1, 2, 3])
    with pytest.raises(MiOptError, match="0..3"):
        drop_layers_(model, [4])
    assert get_adapter(model).n_layers() == 4 and model.config.num_hidden_layers == 4
