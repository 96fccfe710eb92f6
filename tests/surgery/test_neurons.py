"""Neuron pruning deletes MLP weights yet computes exactly what zero-ablating those neurons
computes; every bad request is one clear error, raised before the model changes."""
from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, tiny_model, tiny_windows

from mi_opt.arch import get_adapter
from mi_opt.artifacts import model_fingerprint
from mi_opt.errors import MiOptError
from mi_opt.hooks import Hook, attached
from mi_opt.plan import CompressionPlan
from mi_opt.surgery import apply_
from mi_opt.surgery.neurons import mlp_sizes, prune_neurons_

# Layer -> neurons to delete: different counts per layer (free), and a uniform one (tiny MLPs
# have 64 neurons, GPT-2's 128).
FREE = {0: [0, 5, 63], 1: list(range(10, 40)), 3: [7]}
UNIFORM = {i: list(range(i, 64, 4)) for i in range(4)}  # 16 of each layer's neurons


def _zero_neurons_logits(model, prune: dict[int, list[int]], ids: torch.Tensor) -> torch.Tensor:
    """The model's logits with the activations of `prune`'s neurons zeroed at the output projection's input."""
    adapter = get_adapter(model)
    hooks = []
    for layer, neurons in prune.items():
        cols = torch.tensor(neurons)

        def zero(module, args, cols=cols):
            x = args[0].clone()
            x[..., cols] = 0
            return (x, *args[1:])
        hooks.append(Hook(adapter.mlp_output_projection(adapter.layers()[layer]), zero, kind="forward_pre"))
    with torch.no_grad(), attached(hooks):
        return model(ids).logits


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _plan(model, **kw) -> CompressionPlan:
    return CompressionPlan(model={"spec": "tiny", "fingerprint": model_fingerprint(model), "n_layers": 4}, **kw)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_free_pruning_equals_zero_ablation(family):
    model = tiny_model(family)
    ids = tiny_windows(2, 12)
    expected = _zero_neurons_logits(model, FREE, ids)
    adapter = get_adapter(model)
    width, per_neuron = adapter.mlp_width(0), adapter.neuron_params(0)
    before = sum(p.numel() for p in model.parameters())
    prune_neurons_(model, FREE, mode="free")
    assert sum(p.numel() for p in model.parameters()) == before - sum(map(len, FREE.values())) * per_neuron
    assert mlp_sizes(model) == [width - len(FREE.get(i, [])) for i in range(4)]
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_pruning_equals_zero_ablation_and_the_config_says_the_size(family):
    model = tiny_model(family)
    ids = tiny_windows(2, 12)
    width = get_adapter(model).mlp_width(0)
    prune = {i: list(range(i, width, 4)) for i in range(4)}  # a quarter of every layer
    expected = _zero_neurons_logits(model, prune, ids)
    apply_(model, _plan(model, prune_neurons=prune, neuron_mode="uniform"))
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    cfg = model.config.get_text_config()
    assert (cfg.n_inner if family == "gpt2" else cfg.intermediate_size) == width * 3 // 4
    assert get_adapter(model).mlp_sizes_unloadable(mlp_sizes(model)) is None


def test_neurons_then_dropped_layers_keep_original_numbering():
    model = tiny_model("llama")
    ids = tiny_windows(2, 12)
    plan = _plan(model, drop_layers=[2], prune_neurons={1: [1, 2, 3], 3: [0]}, neuron_mode="free",
                 prune_heads={0: [1]}, head_mode="free")
    apply_(model, plan)
    assert mlp_sizes(model) == [64, 61, 63]  # layer 2 is gone; original layers 0, 1, 3 remain
    assert torch.isfinite(_logits(model, ids)).all()


def test_a_plan_removing_every_neuron_of_a_layer_changes_nothing():
    model = tiny_model("llama")
    before = _state(model)
    plan = _plan(model, prune_neurons={0: [1, 2], 2: list(range(64))}, neuron_mode="free")
    with pytest.raises(MiOptError, match="removes all 64 MLP neurons.*drop_layers"):
        apply_(model, plan)
    assert _unchanged(model, before) and mlp_sizes(model) == [64] * 4


@pytest.mark.parametrize("prune, mode, message", [
    ({0: [64]}, "free", r"neuron\(s\) \[64\] do not exist; it has neurons 0..63"),
    ({1: [-1]}, "free", r"neuron\(s\) \[-1\] do not exist"),
    ({7: [0]}, "free", r"layer\(s\) \[7\]: the model has layers 0..3"),
    ({0: [1, 2], 1: [3]}, "uniform", r"same MLP size in every layer.*sizes \[62, 63, 64\].*'free'"),
])
def test_bad_requests_are_one_clear_error_and_change_nothing(prune, mode, message):
    model = tiny_model("llama")
    before = _state(model)
    with pytest.raises(MiOptError, match=message):
        prune_neurons_(model, prune, mode)
    assert _unchanged(model, before)
    with pytest.raises(MiOptError, match=message):  # the same refusal when a plan asks
        apply_(model, _plan(model, prune_neurons=prune, neuron_mode=mode))
    assert _unchanged(model, before)


def test_a_dropped_layer_is_not_part_of_the_uniform_check():
    model = tiny_model("llama")
    prune = {0: [1], 1: [2], 3: [3]}  # layer 2 keeps 64, but it is dropped
    apply_(model, _plan(model, drop_layers=[2], prune_neurons=prune, neuron_mode="uniform"))
    assert mlp_sizes(model) == [63, 63, 63] and model.config.intermediate_size == 63


def test_an_unknown_mode_is_refused():
    with pytest.raises(MiOptError, match="neuron_mode must be one of"):
        CompressionPlan(model={}, prune_neurons={0: [1]}, neuron_mode="ragged")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pruning_a_quantized_layer_is_refused_before_any_layer_changes(family):
    pytest.importorskip("bitsandbytes")
    from mi_opt.surgery.quantize import quantize_

    model = tiny_model(family)
    quantize_(model, {"L2": 8})
    before = _state(model)
    with pytest.raises(MiOptError, match="layer 2: cannot prune MLP neurons of a quantized layer"):
        prune_neurons_(model, {0: [1, 2], 2: [3]}, "free")  # layer 0 first: it must stay as it was
    assert _unchanged(model, before)
