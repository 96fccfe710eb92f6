import json

import pytest
from tiny import save_tiny

import mi_opt.evaluate
from mi_opt.evaluate import ab_speed
from mi_opt.cli import main
from mi_opt.recipe import recipe_from_dict
from mi_opt.run import run


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("m") / "tiny"))


def _recipe(folder, name="t", parts=("perplexity", "speed"), seed=0, planner=None, heal=None):
    policy = planner or {"planner": "combined",
                         "options": {"layer_skip": {"n_drop": 1}, "head_prune": {"fraction": 0.5}}}
    return recipe_from_dict({**({"heal": heal} if heal else {}),
        "name": name, "model": {"name": folder},
        "data": {"calibration": "kjv", "n_samples": 4, "seq_len": 16, "seed": seed},
        "profile": {"scorer": "ablation", "options": {"unit_kinds": ["layer", "head"], "batch_size": 2}},
        "policy": policy,
        "evaluate": {"parts": list(parts), "ppl_samples": 2, "ppl_seq_len": 16, "task_limit": 2,
                     "tasks": ["miopt_arithmetic"], "speed": {"repetitions": 1, "prompt_len": 8, "new_tokens": 4}}})


def test_full_run_writes_every_stage_and_a_report(tiny_folder, tmp_path, monkeypatch):
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
    # a timing recorded by another version of the A/B artifact is measured again, nothing else
    monkeypatch.setattr(ab_speed, "VERSION", ab_speed.VERSION + 1)
    newer = run(_recipe(tiny_folder, parts=("perplexity", "tasks", "speed")), tmp_path / "t", progress=False)
    assert newer.stages_run == ["speed_ab"]
    assert json.loads((result.folder / "speed_ab.json").read_text())["version"] == ab_speed.VERSION


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


def test_a_run_killed_inside_an_evaluation_resumes_at_the_unfinished_task(tiny_folder, tmp_path, monkeypatch):
    import mi_opt.evaluate.tasks as tasks

    recipe = recipe_from_dict({**_recipe(tiny_folder, parts=("tasks",)).to_dict(),
                               "evaluate": {"parts": ["tasks"], "task_limit": 2,
                                            "tasks": ["miopt_arithmetic", "miopt_capitals"]}})
    real, calls = tasks._lm_eval, []

    def counted(lm, specs, *args):
        calls.append(specs[0]["task"])
        if len(calls) == 4:  # original: 2 tasks; compressed: arithmetic done, killed in capitals
            raise KeyboardInterrupt
        return real(lm, specs, *args)

    monkeypatch.setattr(tasks, "_lm_eval", counted)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "t", progress=False)
    assert list((tmp_path / "t").glob("eval_compressed.tasks-work-*"))   # the finished task is kept
    resumed = run(recipe, tmp_path / "t", progress=False)
    assert calls[4:] == ["miopt_capitals"] and "eval_compressed" in resumed.stages_run
    assert not list(tmp_path.rglob("*tasks-work*"))                       # and removed once the stage is done
    kept = json.loads((tmp_path / "t" / "eval_compressed.json").read_text())
    assert set(kept["tasks"]) == {"miopt_arithmetic", "miopt_capitals"}


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


HEAL = {"method": "distill", "train": "lora", "source": "kjv", "steps": 2, "batch_size": 2, "seq_len": 16,
        "eval_seq_len": 16, "save_steps": 2, "lr": 1e-3}


def _counting_loads(monkeypatch):
    """Every model mi_opt.models.load_model returns, in order: the run's own, then the original's copies."""
    import mi_opt.models

    loads, real = [], mi_opt.models.load_model

    def counted(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        loads.append(model)
        return model, tokenizer
    monkeypatch.setattr(mi_opt.models, "load_model", counted)
    return loads


def _same_weights(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_one_copy_of_the_original_serves_the_speed_ab_and_the_heal_and_stays_unchanged(tiny_folder, tmp_path,
                                                                                          monkeypatch):
    from transformers import AutoModelForCausalLM

    loads = _counting_loads(monkeypatch)
    result = run(_recipe(tiny_folder, heal=HEAL), tmp_path / "t", progress=False)
    assert result.stages_run[4:] == ["speed_ab", "heal", "eval_healed", "export"]
    assert len(loads) == 2  # the model compressed, and one copy of the original for both stages
    assert _same_weights(loads[1], AutoModelForCausalLM.from_pretrained(tiny_folder))  # the teacher is untouched
    # merged adapters: the healed model computes with the compressed model's modules; the report says so
    assert json.loads((result.folder / "speed_ab.json").read_text())["labels"] == ["original", "t"]
    report = result.report.read_text()
    assert "t healed has the compressed model's shapes (its LoRA adapters merged into the weights): it shares " \
           "t's shapes and speed" in report
    table = json.loads((result.folder / "compare.json").read_text())
    prefill = next(r for r in table["rows"] if r["metric"] == "prefill ms")
    assert prefill["paired"]["t healed"] == prefill["paired"]["t"]
    assert "timed on its own" not in report
    # sizes: in memory as evaluated, and on disk where files exist (the original's folder, the checkpoint)
    from mi_opt.evaluate.speed import disk_bytes

    size = next(r for r in table["rows"] if r["metric"] == "size on disk MB")["values"]
    assert size["original"] * 1e6 == pytest.approx(disk_bytes(tiny_folder))
    assert size["t healed"] * 1e6 == pytest.approx(disk_bytes(result.folder / "checkpoint")) and size["t"] is None
    assert "| size MB |" in report and "| size on disk MB |" in report


def test_kept_adapters_put_the_healed_model_in_the_same_ab_rounds(tiny_folder, tmp_path, monkeypatch):
    import mi_opt.evaluate.ab_speed
    from mi_opt.adapters import lora_layers

    loads = _counting_loads(monkeypatch)
    with_adapters, real = [], mi_opt.evaluate.ab_speed.timed_generation

    def timed(model, *args):
        with_adapters.append(bool(lora_layers(model)))
        return real(model, *args)
    monkeypatch.setattr(mi_opt.evaluate.ab_speed, "timed_generation", timed)
    result = run(_recipe(tiny_folder, heal={**HEAL, "adapters": "keep"}), tmp_path / "k", progress=False)
    assert result.stages_run[4:] == ["heal", "speed_ab", "eval_healed", "export"]
    assert len(loads) == 2
    ab = json.loads((result.folder / "speed_ab.json").read_text())
    assert ab["labels"] == ["original", "t", "t healed"] and "set aside" in ab["views"]["t"]
    assert set(ab["vs_baseline"]) == {"t", "t healed"}
    # warm-up and one round each: only the healed model's runs compute with the adapters
    assert sorted(with_adapters) == [False] * 4 + [True] * 2
    report = result.report.read_text()
    assert "t was timed as t healed with its LoRA adapters set aside" in report and "shares" not in report
    # a rerun with every stage done reuses the A/B; a lost A/B file puts the healed weights back first
    (result.folder / "speed_ab.json").unlink()
    again = run(_recipe(tiny_folder, heal={**HEAL, "adapters": "keep"}), tmp_path / "k", progress=False)
    assert again.stages_run == ["speed_ab"] and "heal" in again.stages_reused
    assert sorted(with_adapters[6:]) == [False] * 4 + [True] * 2
