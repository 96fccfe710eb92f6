"""The replay engine's shortcuts compute what the plain replay and full logits compute."""
import pytest
import torch
from tiny import FAMILIES, tiny_model, tiny_windows

from mi_opt.arch import get_adapter
from mi_opt.hooks import Hook, attached
from mi_opt.profile.engine import CleanReference, LayerInputs


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_shortcut_replays_exactly_what_the_attention_computes(family):
    adapter, ids = get_adapter(tiny_model(family)), tiny_windows(2, 16)
    with torch.inference_mode():
        plain, short = LayerInputs.record(adapter, ids), LayerInputs.record(adapter, ids, attention=True)
        assert all(z is not None for z in short.head_outputs)   # every family here takes the shortcut
        head_proj = adapter.head_output_proj(adapter.layers()[1])
        zero_head = Hook(head_proj, lambda m, a: (a[0] * torch.arange(a[0].shape[-1]).ge(4),), kind="forward_pre")
        for layer in range(adapter.n_layers()):
            assert torch.equal(short.replay_from(layer, 2)[0], plain.replay_from(layer, 2)[0])
        with attached([zero_head]):  # a head ablation acts on the projection the shortcut still runs
            ablated, reference = short.replay_from(1, 2)[0], plain.replay_from(1, 2)[0]
        assert torch.equal(ablated, reference) and not torch.equal(ablated, plain.replay_from(1, 2)[0])
    assert "forward" not in adapter.attention(adapter.layers()[1]).__dict__   # the stand-in is gone


def test_no_shortcut_where_the_attention_output_is_not_its_projection():
    adapter, ids = get_adapter(tiny_model("llama")), tiny_windows(2, 16)
    attention = adapter.attention(adapter.layers()[2])
    shifted = Hook(attention, lambda m, a, out: (out[0] + 1, *out[1:]))   # something after o_proj
    with torch.inference_mode(), attached([shifted]):
        inputs = LayerInputs.record(adapter, ids, attention=True)
    assert inputs.head_outputs[2] is None
    assert all(inputs.head_outputs[i] is not None for i in (0, 1, 3))


class _ZeroAttention(torch.nn.Module):
    """A removed attention block's stand-in: no output projection to hook."""

    def forward(self, hidden_states=None, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


def test_a_layer_without_an_output_projection_replays_without_the_shortcut():
    model = tiny_model("llama")
    adapter, ids = get_adapter(model), tiny_windows(2, 16)
    adapter.layers()[1].self_attn = _ZeroAttention()
    with torch.inference_mode():
        inputs = LayerInputs.record(adapter, ids, attention=True)
        plain = LayerInputs.record(adapter, ids)
        assert inputs.head_outputs[1] is None and inputs.head_outputs[0] is not None
        assert torch.equal(inputs.replay_from(1)[0], plain.replay_from(1)[0])


def _whole_vocabulary_reference(adapter, final, ids) -> CleanReference:
    ref = CleanReference(adapter, final, ids, chunk=64)
    ref.blocks = False
    return ref


@pytest.mark.parametrize("head_scale", [1.0, 100.0])   # 100: logits far past exp's range: the fallback
def test_vocabulary_blocks_score_what_whole_logits_score(head_scale, monkeypatch):
    adapter, ids = get_adapter(tiny_model("qwen2")), tiny_windows(4, 16)
    passes = []
    real_blocks = CleanReference._vocab_blocks
    monkeypatch.setattr(CleanReference, "_vocab_blocks",
                        lambda self, head, normed: passes.append(len(normed)) or real_blocks(self, head, normed))
    with torch.inference_mode():
        final = adapter.decoder()(ids, use_cache=False).last_hidden_state
        torch.manual_seed(0)
        perturbed = torch.cat([final, final + torch.randn_like(final)])
        blocks = CleanReference(adapter, final, ids, chunk=64, vocab_chunk=100)
        whole = _whole_vocabulary_reference(adapter, final, ids)
        adapter.lm_head().weight.mul_(head_scale)   # the perturbation: logits scaled up
        (nll_b, kl_b), (nll_w, kl_w) = blocks.score(perturbed), whole.score(perturbed)
    assert blocks.blocks and torch.isfinite(nll_b).all() and torch.isfinite(kl_b).all()
    torch.testing.assert_close(nll_b, nll_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_b, kl_w, rtol=1e-5, atol=1e-5)
    assert kl_b[4:].min() > 1e-4   # the perturbed half really differs from the clean run
    assert len(passes) == (2 if head_scale == 1.0 else 4)   # one pass per chunk, plus one per unsafe chunk
