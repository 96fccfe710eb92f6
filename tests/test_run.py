import json

import pytest
from tiny import save_tiny

import mi_opt.evaluate
from mi_opt.cli import main
from mi_opt.recipe import recipe_from_dict
from mi_opt.run import run


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("m") / "tiny"))


def _recipe(folder, name="t", parts=("perplexity", "speed"), seed=0, planner=None):
    policy = planner or {"planner": "combined",
                         "options": {"layer_skip": {"n_drop": 1}, "head_prune": {"fraction": 0.5}}}
    return recipe_from_dict({
        "name": name, "model": {"name": folder},
        "data": {"calibration": "kjv", "n_samples": 4, "seq_len": 16, "seed": seed},
        "profile": {"scorer": "ablation", "options": {"unit_kinds": ["layer", "head"], "batch_size": 2}},
        "policy": policy,
        "evaluate": {"parts": list(parts), "ppl_samples": 2, "ppl_seq_len": 16, "task_limit": 2,
                     "tasks": ["miopt_arithmetic"], "speed": {"repetitions": 1, "prompt_len": 8, "new_tokens": 4}}})


def test_full_run_writes_every_stage_and_a_report(tiny_folder, tmp_path):
    result = run(_recipe(tiny_folder, parts=("perplexity", "tasks", "speed")), tmp_path / "t", progress=False)
    assert result.stages_run == ["profile", "plan", "eval_original", "eval_compressed", "speed_ab", "export"]
    ab = json.loads((result.folder / "speed_ab.json").read_text())
    assert ab["labels"] == ["original", "t"] and ab["schema"] == "mi-opt/speed-ab"
    assert "interleaved rounds" in result.report.read_text()
    assert (result.folder / "eval_compressed.lm_eval.json").is_file()
    for name in ("profile.json", "plan.json", "eval_original.json", "eval_compressed.json", "report.md",
                 "report.html", "decisions.png", "pareto.png", "heads.png", "checkpoint/config.json"):
        assert (tmp_path / "t" / name).exists(), name
    report = (tmp_path / "t" / "report.md").read_text()
    assert "Dropped 1 of 4 layers" in report and "Pruned 6 attention heads" in report
    assert "miopt_arithmetic" in report and "decode tokens/s" in report
    compressed = json.loads((tmp_path / "t" / "eval_compressed.json").read_text())
    original = json.loads((tmp_path / "t" / "eval_original.json").read_text())
    assert compressed["speed"]["parameters"] < original["speed"]["parameters"]
    again = run(_recipe(tiny_folder, parts=("perplexity", "tasks", "speed")), tmp_path / "t", progress=False)
    assert again.stages_run == [] and "profile" in again.stages_reused


def test_resume_after_a_crash_between_stages(tiny_folder, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while evaluating")

    monkeypatch.setattr(mi_opt.evaluate, "evaluate", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(_recipe(tiny_folder), tmp_path / "t", progress=False)
    folder = tmp_path / "t"
    assert (folder / "profile.json").exists() and (folder / "plan.json").exists()
    assert not list(folder.glob(".*"))  # no temporary half-written files left
    monkeypatch.undo()
    resumed = run(_recipe(tiny_folder), folder, progress=False)
    assert resumed.stages_reused[:2] == ["profile", "plan"]
    assert "eval_compressed" in resumed.stages_run


def test_changed_settings_are_recomputed_not_reused(tiny_folder, tmp_path):
    run(_recipe(tiny_folder), tmp_path / "t", progress=False)
    changed = run(_recipe(tiny_folder, seed=1), tmp_path / "t", progress=False)
    assert "profile" in changed.stages_run and "plan" in changed.stages_run
    other_policy = run(_recipe(tiny_folder, seed=1, planner={"planner": "layer-skip", "options": {"n_drop": 2}}),
                       tmp_path / "t", progress=False)
    assert "profile" in other_policy.stages_reused and "plan" in other_policy.stages_run


def test_compare_recipes_cli(tiny_folder, tmp_path, capsys):
    paths = []
    for name, planner in [("drop1", {"planner": "layer-skip", "options": {"n_drop": 1}}),
                          ("heads", {"planner": "head-prune", "options": {"fraction": 0.5}})]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(_recipe(tiny_folder, name=name, planner=planner).to_yaml())
        paths.append(str(path))
    assert main(["compare-recipes", *paths, "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "drop1" in out and "heads" in out and "perplexity" in out
    assert (tmp_path / "runs" / "comparison" / "pareto.png").exists()
    table = json.loads((tmp_path / "runs" / "comparison" / "compare.json").read_text())
    assert table["labels"] == ["original", "drop1", "heads"]
    # each recipe's speedup comes from its own A/B rounds beside a fresh original
    assert table["speed_ab"]["merged_from"] == ["drop1", "heads"]
    prefill = next(r for r in table["rows"] if r["metric"] == "prefill ms")
    assert prefill["paired"]["heads"]["test"].startswith("median and IQR of per-round ratios")


def test_run_folder_stays_inside_out(tmp_path):
    from mi_opt.errors import MiOptError
    from mi_opt.run import run_folder

    assert run_folder(tmp_path / "runs", "t") == tmp_path / "runs" / "t"
    for name in ("../x", "/tmp/x", "a/../../x"):  # refused even if a Recipe object was edited after checks
        with pytest.raises(MiOptError, match="cannot name a run folder"):
            run_folder(tmp_path / "runs", name)
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(MiOptError, match="outside"):
        run_folder(tmp_path / "runs", "linked")


@pytest.mark.parametrize("link", ["t", "_baseline"])
def test_a_run_writes_nothing_through_links_out_of_its_out_folder(tiny_folder, tmp_path, link):
    from mi_opt.errors import MiOptError

    out, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / link).symlink_to(elsewhere)
    with pytest.raises(MiOptError, match=f"{link} resolves to .*outside"):
        run(_recipe(tiny_folder), out / "t", progress=False)
    assert not list(elsewhere.iterdir())


def test_cli_run_refuses_an_escaping_recipe_before_any_work(tmp_path, capsys):
    recipe = tmp_path / "escape.yaml"
    recipe.write_text("name: ../escape\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "runs")]) == 2
    assert "cannot name a run folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escape.yaml"]


def _manifest(folder):
    return json.loads((folder / "stages.json").read_text())["stages"]


def test_a_rerun_without_export_removes_the_earlier_checkpoint(tiny_folder, tmp_path):
    folder = tmp_path / "t"
    first = run(_recipe(tiny_folder), folder, progress=False)
    assert "export" in first.stages_run and (folder / "checkpoint").is_dir()
    recipe = _recipe(tiny_folder, planner={"planner": "layer-skip", "options": {"n_drop": 2}})
    recipe.export.enabled = False
    second = run(recipe, folder, progress=False)
    assert not (folder / "checkpoint").exists()  # it was the 3-layer model; the report says 2 layers
    stages = _manifest(folder)
    assert set(stages) == set(second.stages_run + second.stages_reused) and "export" not in stages
    assert all((folder / o).exists() for entry in stages.values() for o in entry["outputs"])
    report = (folder / "report.md").read_text()
    assert "Dropped 2 of 4 layers" in report and "checkpoint/" not in report


def test_a_recomputed_profile_leaves_no_plot_of_the_earlier_one(tiny_folder, tmp_path):
    folder = tmp_path / "t"
    run(_recipe(tiny_folder), folder, progress=False)
    assert (folder / "heads.png").exists()
    recipe = _recipe(tiny_folder, planner={"planner": "layer-skip", "options": {"n_drop": 1}})
    recipe.profile.options = {"unit_kinds": ["layer"], "batch_size": 2}
    recipe.export.enabled = False
    run(recipe, folder, progress=False)
    assert not (folder / "heads.png").exists()  # the new profile has no heads to plot
    assert _manifest(folder)["profile"]["outputs"] == ["profile.json", "layers.png"]
    assert "Importance of each head" not in (folder / "report.md").read_text()


def test_a_tampered_manifest_cannot_delete_outside_the_run_folder(tiny_folder, tmp_path):
    from mi_opt.errors import MiOptError
    from mi_opt.run import RunFolder

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = RunFolder(tmp_path / "t", {"export": {"hash": "x", "outputs": ["../victim.txt"], "finished": ""}})
    (tmp_path / "t").mkdir()
    with pytest.raises(MiOptError, match="not a file in the run folder"):
        folder.forget("export")
    assert victim.read_text() == "keep me"


def test_weights_changed_past_the_first_values_recompute_every_stage(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny(tmp_path / "m")
    run(_recipe(str(model_dir)), tmp_path / "t", progress=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.view(-1)[-1] += 0.5
    model.save_pretrained(model_dir)
    again = run(_recipe(str(model_dir)), tmp_path / "t", progress=False)
    assert again.stages_reused == [] and "export" in again.stages_run
