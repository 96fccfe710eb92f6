"""The heal stage of `mi-opt run` and the `mi-opt heal` verb, on a tiny local model folder."""
from __future__ import annotations

import json

import mi_opt.run
import pytest
import torch
from tiny import save_tiny
from transformers import AutoModelForCausalLM

from mi_opt.cli import main
from mi_opt.recipe import recipe_from_dict
from mi_opt.run import run

HEAL = {"method": "local+distill", "train": "localized", "source": "kjv", "steps": 3, "batch_size": 2,
        "seq_len": 16, "eval_seq_len": 16, "save_steps": 2, "local_steps": 10, "local_windows": 4, "lr": 1e-3, "local_lr": 1e-3}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("m") / "tiny"))


def _recipe(folder, heal=HEAL, export=True):
    return recipe_from_dict({
        "name": "h", "model": {"name": folder},
        "data": {"calibration": "kjv", "n_samples": 4, "seq_len": 16},
        "profile": {"scorer": "block_influence", "options": {"batch_size": 2}},
        "policy": {"planner": "layer-skip", "options": {"n_drop": 1}},
        "heal": heal,
        "evaluate": {"parts": ["perplexity"], "ppl_samples": 2, "ppl_seq_len": 16},
        "export": {"enabled": export}})


def test_a_run_heals_evaluates_before_and_after_and_exports_the_healed_model(tiny_folder, tmp_path):
    result = run(_recipe(tiny_folder), tmp_path / "h", progress=False)
    assert result.stages_run == ["profile", "plan", "eval_original", "eval_compressed", "heal", "eval_healed",
                                 "export"]
    folder = tmp_path / "h"
    report = (folder / "report.md").read_text()
    assert "h healed" in report and "Recovery after compression" in report
    assert "KL to the original" in (folder / "checkpoint" / "README.md").read_text()
    heal = json.loads((folder / "checkpoint" / "heal.json").read_text())
    assert heal["schema"] == "mi-opt/heal" and heal["kl_to_teacher"]["after"] < heal["kl_to_teacher"]["before"]
    healed = json.loads((folder / "eval_healed.json").read_text())["perplexity"]["perplexity"]
    unhealed = json.loads((folder / "eval_compressed.json").read_text())["perplexity"]["perplexity"]
    assert healed != unhealed
    assert not list(folder.glob("heal-work-*"))  # checkpoints of a finished heal are gone
    # the exported checkpoint is the healed model: plain transformers reloads it
    reloaded = AutoModelForCausalLM.from_pretrained(folder / "checkpoint").eval()
    assert reloaded.config.num_hidden_layers == 3
    again = run(_recipe(tiny_folder), folder, progress=False)
    assert again.stages_run == [] and {"heal", "eval_healed", "export"} <= set(again.stages_reused)



def test_a_run_that_keeps_the_adapters_ships_them_and_a_rerun_puts_them_back(tiny_folder, tmp_path):
    from mi_opt.export import load_compressed

    heal = {**HEAL, "method": "distill", "train": "lora", "adapters": "keep"}
    result = run(_recipe(tiny_folder, heal=heal), tmp_path / "k", progress=False)
    assert "heal" in result.stages_run
    checkpoint = tmp_path / "k" / "checkpoint"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = load_compressed(checkpoint)
    assert sorted(n for n, _ in reloaded.named_parameters() if ".lora_" in n) \
        == sorted(json.loads((tmp_path / "k" / "heal.json").read_text())["changed"])
    # other evaluation settings: the heal is reused and its kept adapters are put back on the model
    recipe = _recipe(tiny_folder, heal=heal)
    recipe.evaluate.ppl_samples = 3
    again = run(recipe, tmp_path / "k", progress=False)
    assert "heal" in again.stages_reused and "eval_healed" in again.stages_run
    measured = {name: json.loads((tmp_path / "k" / f"eval_{name}.json").read_text())["perplexity"]["perplexity"]
                for name in ("compressed", "healed")}
    assert measured["healed"] != measured["compressed"]


def test_a_crash_after_healing_reuses_the_healed_weights(tiny_folder, tmp_path, monkeypatch):
    reference = run(_recipe(tiny_folder), tmp_path / "a", progress=False)
    want = json.loads((reference.folder / "eval_healed.json").read_text())["perplexity"]["perplexity"]

    real_evaluate = mi_opt.evaluate.evaluate
    def crash_on_healed(model, tokenizer, config, spec=None, **kw):
        if spec and spec.endswith("healed]"):
            raise RuntimeError("simulated crash while evaluating the healed model")
        return real_evaluate(model, tokenizer, config, spec=spec, **kw)

    monkeypatch.setattr(mi_opt.evaluate, "evaluate", crash_on_healed)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(_recipe(tiny_folder), tmp_path / "b", progress=False)
    monkeypatch.undo()
    resumed = run(_recipe(tiny_folder), tmp_path / "b", progress=False)
    assert "heal" in resumed.stages_reused and "eval_healed" in resumed.stages_run
    got = json.loads((resumed.folder / "eval_healed.json").read_text())["perplexity"]["perplexity"]
    assert got == pytest.approx(want, rel=1e-6)


def test_dropping_the_heal_section_removes_its_outputs(tiny_folder, tmp_path):
    run(_recipe(tiny_folder, export=False), tmp_path / "h", progress=False)
    assert (tmp_path / "h" / "heal.json").exists()
    run(_recipe(tiny_folder, heal=None, export=False), tmp_path / "h", progress=False)
    for name in ("heal.json", "healed.safetensors", "eval_healed.json"):
        assert not (tmp_path / "h" / name).exists(), name
    assert "healed" not in (tmp_path / "h" / "report.md").read_text()


def test_cli_heal_heals_an_exported_checkpoint(tiny_folder, tmp_path, capsys):
    run(_recipe(tiny_folder, heal=None), tmp_path / "h", progress=False)
    checkpoint = tmp_path / "h" / "checkpoint"
    out = tmp_path / "healed"
    args = ["heal", str(checkpoint), "--teacher", tiny_folder, "--out", str(out), "--method", "distill",
            "--steps", "2", *[f"--option={k}={v}" for k, v in HEAL.items() if k not in ("method", "steps", "eval_seq_len")]]
    assert main(args) == 0
    assert "healed:" in capsys.readouterr().out
    assert (out / "heal.json").exists() and (out / "plan.json").exists()
    assert not list(tmp_path.glob("healed.heal-work*"))
    before = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    after = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert not torch.equal(before(ids).logits, after(ids).logits)
    assert main(args) == 2  # --out exists: refused without --force
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--option", "stepz=3"], "heal.stepz"), (["--method", "magic"], "heal.method"),
    (["--option", "steps=two"], "heal.steps"),
])
def test_cli_heal_bad_options_fail_before_loading_anything(extra, message, tmp_path, capsys):
    assert main(["heal", str(tmp_path / "nowhere"), "--teacher", "x", "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_heal_refuses_a_folder_that_is_not_an_export(tiny_folder, tmp_path, capsys):
    assert main(["heal", tiny_folder, "--teacher", tiny_folder, "--out", str(tmp_path / "o")]) == 2
    assert "not an mi-opt export" in capsys.readouterr().err
