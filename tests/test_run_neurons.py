"""`run` carries a plan that prunes MLP neurons end to end: apply, evaluate, export, report.

Width planners live in mi_opt.policy (built separately); a stand-in planner registered for this
test emits the plan, so the pipeline is tested on its own."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from tiny import save_tiny

from mi_opt.plan import CompressionPlan
from mi_opt.policy.base import PLANNERS, Planner
from mi_opt.recipe import recipe_from_dict
from mi_opt.run import run


@dataclass
class EveryKth:
    k: int = 4  # delete every k-th neuron of every layer


def _every_kth(profile, cfg: EveryKth, ctx) -> CompressionPlan:
    prune = {i: list(range(0, w, cfg.k)) for i, w in enumerate(ctx.cost.mlp_width)}
    return CompressionPlan(model={}, prune_neurons=prune, neuron_mode="uniform",
                           predicted=ctx.cost.predicted([], {}, prune))


@pytest.fixture
def neuron_planner(monkeypatch):
    monkeypatch.setitem(PLANNERS._items, "test-every-kth-neuron", Planner(EveryKth, _every_kth, "test stand-in"))


def test_a_neuron_plan_runs_end_to_end(neuron_planner, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = str(save_tiny(tmp_path / "tiny"))
    recipe = recipe_from_dict({
        "name": "narrow", "model": {"name": folder},
        "data": {"calibration": "kjv", "n_samples": 4, "seq_len": 16, "seed": 0},
        "profile": {"scorer": "ablation", "options": {"unit_kinds": ["layer"], "batch_size": 2}},
        "policy": {"planner": "test-every-kth-neuron", "options": {"k": 4}},
        "evaluate": {"parts": ["perplexity", "speed"], "ppl_samples": 2, "ppl_seq_len": 16,
                     "speed": {"repetitions": 1, "prompt_len": 8, "new_tokens": 4}}})
    result = run(recipe, tmp_path / "runs" / "narrow", progress=False)
    assert "export" in result.stages_run
    plan = CompressionPlan.load(result.folder / "plan.json")
    assert plan.prune_neurons[0] == list(range(0, 64, 4)) and plan.neuron_mode == "uniform"
    sidecar = json.loads((result.folder / "checkpoint" / "mi-opt-compression.json").read_text())
    assert sidecar["mlp_sizes"] == [48] * 4 and sidecar["loader"] == "transformers"
    assert sidecar["parameters"] == plan.predicted["parameters"]
    reloaded = AutoModelForCausalLM.from_pretrained(result.folder / "checkpoint")
    assert reloaded.config.intermediate_size == 48
    compressed = json.loads((result.folder / "eval_compressed.json").read_text())
    original = json.loads((result.folder / "eval_original.json").read_text())
    assert compressed["speed"]["parameters"] < original["speed"]["parameters"]
    report = result.report.read_text()
    assert "Pruned 64 MLP neurons in 4 layers (uniform mode)" in report and "[48, 48, 48, 48]" in report
    assert "Removed 64 MLP neurons" in (result.folder / "checkpoint" / "README.md").read_text()


def test_the_decision_chart_marks_the_neurons_kept(tmp_path):
    from mi_opt.report import decision_chart, mlp_kept

    plan = CompressionPlan(model={}, drop_layers=[1], prune_neurons={0: [1, 2], 1: [3], 3: list(range(32))},
                           neuron_mode="free", predicted={"mlp_sizes": [62, 64, 32]})
    assert mlp_kept(plan, 4) == {0: 62 / 64, 3: 0.5}  # layer 1 is dropped, layer 2 untouched
    assert decision_chart(plan, [4, 4, 4, 4], tmp_path / "d.png").stat().st_size > 0
