import pytest
import torch
from tiny import FAMILIES, tiny_model

from mi_opt.arch import get_adapter, supported_model_types
from mi_opt.errors import MiOptError


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_structure(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    assert adapter.n_layers() == 4
    for i, layer in enumerate(adapter.layers()):
        geo = adapter.heads(i)
        assert geo.n_heads == 4 and geo.n_heads % geo.n_kv_heads == 0
        assert adapter.head_output_proj(layer) in list(adapter.attention(layer).modules())
        assert adapter.mlp(layer) in list(layer.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_logits_match_model_forward(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        captured = {}
        handle = adapter.layers()[-1].register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
        model(ids)
        handle.remove()
    assert torch.allclose(adapter.logits(captured["h"]), expected, atol=1e-5)


def test_unsupported_architecture_lists_supported():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(MiOptError, match="unsupported architecture 'opt'.*llama"):
        get_adapter(model)
    assert "gpt2" in supported_model_types() and "qwen3" in supported_model_types()
