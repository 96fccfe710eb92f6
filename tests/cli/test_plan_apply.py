"""`mi-opt plan` then `mi-opt apply` on a local tiny model folder, end to end."""
from __future__ import annotations

import json

from tiny import save_tiny, tiny_windows

from mi_opt.cli import main
from mi_opt.export import SIDECAR


def test_plan_then_apply_writes_a_plain_loadable_checkpoint(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from mi_opt.models import load_model
    from mi_opt.profile.ablation import AblationConfig, profile_ablation

    folder = str(save_tiny(tmp_path / "model"))
    model, _ = load_model(folder)
    profile = profile_ablation(model, tiny_windows(4, 16), AblationConfig(unit_kinds=("layer", "head")),
                               model_spec=folder, progress=False)
    profile.save(tmp_path / "profile.json")
    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(tmp_path / "profile.json"), "--planner", "combined", "--budget", "layer_skip.n_drop=1",
                 "--budget", "head_prune.fraction=0.5", "--out", str(plan_path)]) == 0
    plan = json.loads(plan_path.read_text())
    assert len(plan["drop_layers"]) == 1 and plan["planner"]["name"] == "combined"

    out = tmp_path / "out"
    assert main(["apply", folder, str(plan_path), "--out", str(out), "--sample", "The"]) == 0
    assert json.loads((out / SIDECAR).read_text())["loader"] == "transformers"
    assert (out / "profile.json").exists() and (out / "tokenizer.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 3
    assert sum(p.numel() for p in reloaded.parameters()) == plan["predicted"]["parameters"]
    printed = capsys.readouterr().out
    assert "exported:" in printed and "sample:" in printed

    # A second apply to the same folder is refused (rc 2, one-line error) and changes nothing.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["apply", folder, str(plan_path), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_plan_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from mi_opt.models import load_model
    from mi_opt.profile.ablation import AblationConfig, profile_ablation

    folder = str(save_tiny(tmp_path / "model"))
    model, _ = load_model(folder)
    profile_ablation(model, tiny_windows(2, 8), AblationConfig(unit_kinds=("layer",)), model_spec=folder,
                     progress=False).save(tmp_path / "profile.json")
    out = tmp_path / "plan.json"
    assert main(["plan", str(tmp_path / "profile.json"), "--budget", "n_drop=4", "--out", str(out)]) == 2
    assert "cannot drop 4 layers" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "profile.json"), "--planner", "head-prune", "--budget", "fraction=0.5",
                 "--out", str(out)]) == 2
    assert "no head scores" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "profile.json"), "--budget", "n_drop", "--out", str(out)]) == 2
    capsys.readouterr()
    # With nothing protected the planner reaches every layer; the plan is refused, not written.
    assert main(["plan", str(tmp_path / "profile.json"), "--budget", "n_drop=4", "--option", "protect_first=0",
                 "--option", "protect_last=0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert err.startswith("mi-opt plan: error: the plan would drop all 4 layers"), err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model", "profile.json"]
