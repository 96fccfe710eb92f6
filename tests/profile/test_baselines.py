"""Each baseline against a direct computation of its definition."""
from __future__ import annotations

import math

import pytest
import torch
from tiny import FAMILIES, tiny_model, tiny_windows

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.hooks import Hook, attached
from mi_opt.profile.baselines import (AngularDistanceConfig, BlockInfluenceConfig, RandomConfig,
                                      WeightMagnitudeConfig, angular_distances, best_block,
                                      profile_angular_distance, profile_block_influence, profile_random,
                                      profile_weight_magnitude)


def _hidden_states(model, ids) -> list[torch.Tensor]:
    """Residual stream entering each layer (HF's hidden_states), plus the last layer's raw output.

    HF's last hidden state has the final norm applied, which is not a layer's output.
    """
    adapter = get_adapter(model)
    last = {}
    hook = Hook(adapter.layers()[-1], lambda m, a, out: last.setdefault("out", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad(), attached([hook]):
        hs = model(ids, output_hidden_states=True).hidden_states
    return [h.double() for h in hs[:-1]] + [last["out"].double()]


def _cos(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_block_influence_is_one_minus_cosine_of_input_and_output(family):
    model, ids = tiny_model(family), tiny_windows(8, 16)
    profile = profile_block_influence(model, ids, BlockInfluenceConfig(batch_size=4), progress=False)
    hs = _hidden_states(model, ids)
    for i in range(len(hs) - 1):
        per_batch = [1 - _cos(hs[i][b:b + 4], hs[i + 1][b:b + 4]).mean() for b in (0, 4)]
        expected = sum(per_batch).item() / 2
        assert profile.score(f"L{i}") == pytest.approx(expected, rel=1e-6)
        assert profile.score(f"L{i}", "kl") is None  # schema v2: a baseline measures no KL
        assert profile.scores[f"L{i}"].delta_loss_se is not None
    assert profile.units() == [f"L{i}" for i in range(len(hs) - 1)]
    assert profile.base_loss is None and profile.cost["forwards"] == 2


def test_angular_distance_at_the_last_token_for_contiguous_blocks():
    model, ids = tiny_model("llama"), tiny_windows(6, 16)
    hs = _hidden_states(model, ids)
    n_layers = len(hs) - 1

    def direct(start, n):
        a, b = hs[start][:, -1], hs[start + n][:, -1]
        return (torch.arccos(_cos(a, b).clamp(-1, 1)) / math.pi).mean().item()

    profile = profile_angular_distance(model, ids, AngularDistanceConfig(batch_size=6), progress=False)
    for i in range(n_layers):
        assert profile.score(f"L{i}") == pytest.approx(direct(i, 1), rel=1e-6)
    for n in (2, 3):
        per_batch = angular_distances(model, ids, n, batch_size=6, progress=False)
        assert [v[0] for v in per_batch] == pytest.approx([direct(s, n) for s in range(n_layers - n + 1)], rel=1e-6)
        start, distance = best_block(model, ids, n, batch_size=6, progress=False)
        expected = min(range(n_layers - n + 1), key=lambda s: direct(s, n))
        assert start == expected and distance == pytest.approx(direct(expected, n), rel=1e-6)
    with pytest.raises(MiOptError, match="block size"):
        angular_distances(model, ids, n_layers + 1)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_weight_magnitude_llama_heads_groups_sublayers_layers(norm):
    model = tiny_model("llama")
    adapter = get_adapter(model)
    profile = profile_weight_magnitude(model, config=WeightMagnitudeConfig(norm=norm), progress=False)

    def size(*ws):
        flat = torch.cat([w.detach().double().flatten() for w in ws])
        return flat.abs().sum().item() if norm == "l1" else flat.norm().item()

    layer = adapter.layers()[2]
    attn, mlp, d = layer.self_attn, layer.mlp, adapter.heads(2).head_dim
    assert profile.score("L2.H3") == pytest.approx(size(attn.q_proj.weight[3 * d:4 * d],
                                                        attn.o_proj.weight[:, 3 * d:4 * d]), rel=1e-9)
    # KV group 1 holds query heads 2 and 3 (group size 2) and KV head 1.
    assert profile.score("L2.KV1") == pytest.approx(size(
        attn.q_proj.weight[2 * d:4 * d], attn.o_proj.weight[:, 2 * d:4 * d],
        attn.k_proj.weight[d:2 * d], attn.v_proj.weight[d:2 * d]), rel=1e-9)
    assert profile.score("L2.attn") == pytest.approx(size(attn.q_proj.weight, attn.k_proj.weight,
                                                          attn.v_proj.weight, attn.o_proj.weight), rel=1e-9)
    assert profile.score("L2.mlp") == pytest.approx(size(mlp.gate_proj.weight, mlp.up_proj.weight,
                                                         mlp.down_proj.weight), rel=1e-9)
    assert profile.score("L2") == pytest.approx(size(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                                                     attn.o_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight,
                                                     mlp.down_proj.weight), rel=1e-9)
    assert profile.scores["L2.H3"].delta_loss_se is None


def test_weight_magnitude_gpt2_head_reads_the_fused_projection():
    model = tiny_model("gpt2")
    profile = profile_weight_magnitude(model, config=WeightMagnitudeConfig(unit_kinds=("head",)), progress=False)
    attn, d = model.transformer.h[1].attn, 8  # n_embd 32 / 4 heads
    # Conv1D weights are (in, out): q is the first n_embd output columns of c_attn.
    expected = torch.cat([attn.c_attn.weight[:, d:2 * d].flatten(), attn.c_proj.weight[d:2 * d].flatten()])
    assert profile.score("L1.H1") == pytest.approx(expected.double().norm().item(), rel=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_baseline_runs_on_every_family(family):
    model, ids = tiny_model(family), tiny_windows(4, 16)
    n_layers = get_adapter(model).n_layers()
    for profile in (profile_block_influence(model, ids, progress=False),
                    profile_angular_distance(model, ids, progress=False)):
        assert len(profile.units("layer")) == n_layers
        assert all(0 <= s.delta_loss <= 2 for s in profile.scores.values())
    profile = profile_weight_magnitude(model, progress=False)
    assert all(s.delta_loss > 0 for s in profile.scores.values())


def test_random_is_seeded_and_covers_every_unit():
    model = tiny_model("llama")
    a = profile_random(model, config=RandomConfig(seed=1))
    b = profile_random(model, config=RandomConfig(seed=1))
    c = profile_random(model, config=RandomConfig(seed=2))
    assert a.scores == b.scores and a.scores != c.scores
    assert set(a.scores) == set(profile_weight_magnitude(model, progress=False).scores)
    assert len({s.delta_loss for s in a.scores.values()}) == len(a.scores)


@pytest.mark.parametrize("make", [lambda: BlockInfluenceConfig(unit_kinds=("head",)),
                                  lambda: AngularDistanceConfig(batch_size=0),
                                  lambda: WeightMagnitudeConfig(norm="linf"),
                                  lambda: RandomConfig(unit_kinds=())])
def test_bad_config_is_a_clear_error(make):
    with pytest.raises(MiOptError):
        make()
