"""apply_: every bad plan is refused before the model changes."""
from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from mi_opt.artifacts import model_fingerprint
from mi_opt.errors import MiOptError
from mi_opt.plan import CompressionPlan
from mi_opt.surgery import apply_


def _plan(model, **kw):
    return CompressionPlan(model={"fingerprint": model_fingerprint(model), "n_layers": 4}, **kw)


@pytest.mark.parametrize("kw, message", [
    ({"drop_layers": [0, 1, 2, 3]}, "drops all 4 layers"),
    ({"prune_heads": {1: [0, 1, 2, 3]}}, "all 4 heads"),
    ({"drop_layers": [9]}, "layers 0..3"),
    ({"bits": {"L1.self_attn.qproj": 8}}, "no module 'self_attn.qproj'"),
    ({"bits": {"layer1": 8}}, "unknown bits target"),
    ({"prune_heads": {0: [1]}, "head_mode": "uniform"}, "uniform"),
])
def test_bad_plans_raise_and_leave_the_model_untouched(kw, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MiOptError, match=message):
        apply_(model, _plan(model, **kw))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_plan_for_another_model_is_refused():
    plan = _plan(tiny_model("llama", seed=1), drop_layers=[1])
    model = tiny_model("llama", seed=0)
    with pytest.raises(MiOptError, match="fingerprint"):
        apply_(model, plan)
    assert model.config.num_hidden_layers == 4


def test_heads_of_dropped_layers_are_ignored_and_uniform_check_skips_them():
    model = tiny_model("llama")
    plan = _plan(model, drop_layers=[0], prune_heads={i: [1, 3] for i in range(1, 4)}, head_mode="uniform")
    apply_(model, plan)
    assert model.config.num_hidden_layers == 3 and model.config.num_attention_heads == 2
