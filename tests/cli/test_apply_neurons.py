"""`mi-opt apply` with a neuron-pruning plan: prints the new shapes, and the parameter count it
prints is the checkpoint's (and the planner's prediction)."""
from __future__ import annotations

import json

from tiny import save_tiny

from mi_opt.cli import main
from mi_opt.export import SIDECAR, load_compressed


def _plan_file(tmp_path, folder, **kw):
    from mi_opt.artifacts import model_fingerprint
    from mi_opt.models import load_model
    from mi_opt.plan import CompressionPlan
    from mi_opt.policy.cost import ModelCost

    model, _ = load_model(folder)
    cost = ModelCost.from_model(model)
    plan = CompressionPlan(model={"spec": folder, "fingerprint": model_fingerprint(model), "n_layers": 4},
                           predicted=cost.predicted(kw.get("drop_layers", []), kw.get("prune_heads", {}),
                                                    kw.get("prune_neurons", {})), **kw)
    return plan.save(tmp_path / "plan.json"), plan


def test_apply_prints_the_mlp_sizes_and_the_right_parameter_count(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    folder = str(save_tiny(tmp_path / "model"))
    path, plan = _plan_file(tmp_path, folder, drop_layers=[1], prune_neurons={i: list(range(16)) for i in range(4)},
                            neuron_mode="uniform")
    assert main(["apply", folder, str(path), "--out", str(tmp_path / "u")]) == 0
    printed = capsys.readouterr().out
    assert "shapes: 3 layers; query heads 4 in every layer; MLP size 48 in every layer" in printed
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "u")
    n = sum(p.numel() for p in reloaded.parameters())
    assert n == plan.predicted["parameters"] and f"-> {n:,}" in printed
    assert plan.predicted["mlp_sizes"] == [48, 48, 48]

    path, plan = _plan_file(tmp_path, folder, prune_neurons={0: [1, 2, 3], 2: list(range(50))}, neuron_mode="free")
    assert main(["apply", folder, str(path), "--out", str(tmp_path / "f")]) == 0
    printed = capsys.readouterr().out
    assert "MLP size [61, 64, 14, 64]" in printed and "load_compressed" in printed
    assert json.loads((tmp_path / "f" / SIDECAR).read_text())["parameters"] == plan.predicted["parameters"]
    assert sum(p.numel() for p in load_compressed(tmp_path / "f").parameters()) == plan.predicted["parameters"]


def test_apply_refuses_per_layer_mlp_sizes_for_gguf_before_any_surgery(tmp_path, capsys):
    folder = str(save_tiny(tmp_path / "model"))
    path, _ = _plan_file(tmp_path, folder, prune_neurons={0: [1, 2, 3]}, neuron_mode="free")
    out = tmp_path / "g"
    assert main(["apply", folder, str(path), "--out", str(out), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "MLP sizes differ per layer" in err and "neuron_mode 'uniform'" in err and not out.exists()
