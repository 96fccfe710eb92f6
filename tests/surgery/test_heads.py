"""Head pruning deletes weights yet computes exactly what zero-ablating those heads computes."""
from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, tiny_model, tiny_windows

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.hooks import Hook, attached
from mi_opt.surgery.heads import head_layout, prune_heads_
from mi_opt.arch import HeadGeometry


def _zero_heads_logits(model, prune: dict[int, list[int]], ids: torch.Tensor) -> torch.Tensor:
    adapter = get_adapter(model)
    hooks = []
    for layer, heads in prune.items():
        hd = adapter.heads(layer).head_dim
        cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])

        def zero(module, args, cols=cols):
            x = args[0].clone()
            x[..., cols] = 0
            return (x, *args[1:])
        hooks.append(Hook(adapter.head_output_proj(adapter.layers()[layer]), zero, kind="forward_pre"))
    with torch.no_grad(), attached(hooks):
        return model(ids).logits


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_layout_regroups_uneven_groups_without_losing_heads():
    geo = HeadGeometry(n_heads=9, n_kv_heads=3, head_dim=4)
    lay = head_layout(geo, [0, 1, 3])        # groups keep 1, 2, 3 heads -> gcd 1: one KV copy per head
    assert lay.keep_heads == (2, 4, 5, 6, 7, 8)
    assert lay.kv_sources == (0, 1, 1, 2, 2, 2)
    even = head_layout(geo, [0, 3, 6])       # 2 per group: no duplication
    assert even.kv_sources == (0, 1, 2) and even.group_size == 2
    whole = head_layout(geo, [0, 1, 2, 4, 6])  # group 0 gone entirely, KV rows too; 2 + 2 left
    assert whole.kv_sources == (1, 2) and whole.keep_heads == (3, 5, 7, 8)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_free_pruning_equals_zero_ablation(family, impl):
    model = tiny_model(family, attn_implementation=impl)
    ids = tiny_windows(2, 12)
    prune = {0: [0, 1], 1: [0, 2], 2: [1], 3: [3]}
    expected = _zero_heads_logits(model, prune, ids)
    before = sum(p.numel() for p in model.parameters())
    prune_heads_(model, prune, mode="free")
    assert sum(p.numel() for p in model.parameters()) < before
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    adapter = get_adapter(model)
    assert [adapter.heads(i).n_heads for i in range(4)] == [2, 2, 3, 3]
    if family == "llama":  # layer 0 lost all of KV group 0, so its K/V rows went too
        assert adapter.heads(0).n_kv_heads == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_after_pruning(family):
    model = tiny_model(family, attn_implementation="sdpa")
    prune_heads_(model, {0: [1], 2: [0, 3]}, mode="free")
    prompt = tiny_windows(1, 6)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape[1] == 14
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_uniform_pruning_reloads_with_plain_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, attn_implementation="sdpa")
    ids = tiny_windows(2, 12)
    prune = {i: [1, 3] for i in range(4)}  # one head out of each KV group, every layer
    expected = _zero_heads_logits(model, prune, ids)
    prune_heads_(model, prune, mode="uniform")
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 2
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_uniform_mode_rejects_uneven_plans_and_leaves_model_untouched():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MiOptError, match="uniform"):
        prune_heads_(model, {0: [1]}, mode="uniform")
    with pytest.raises(MiOptError, match="all 4 heads"):
        prune_heads_(model, {0: [0, 1, 2, 3]}, mode="free")
    with pytest.raises(MiOptError, match="do not exist"):
        prune_heads_(model, {0: [7]}, mode="free")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
