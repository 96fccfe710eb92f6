"""`mi-opt eval` and `mi-opt compare` on a local tiny model folder, end to end."""
from __future__ import annotations

import json

import pytest
from tiny import save_tiny

from mi_opt.cli import main

SMALL = ["--ppl-samples", "2", "--seq-len", "32", "--batch-size", "2", "--tasks", "miopt_facts_mc,miopt_arithmetic",
         "--limit", "2", "--prompt-len", "8", "--new-tokens", "3", "--warmup", "0", "--reps", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("m") / "model"))


def test_eval_then_compare(folder, tmp_path, capsys):
    out = tmp_path / "runs" / "base" / "eval.json"
    assert main(["eval", folder, "--out", str(out), *SMALL]) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == "mi-opt/eval" and data["version"] == 2 and "torch" in data["versions"]
    assert data["settings"]["threads"] == 1 and data["settings"]["task_limit"] == 2
    assert set(data["tasks"]) == {"miopt_facts_mc", "miopt_arithmetic"}
    assert data["speed"]["size_kind"] == "disk" and data["model"]["spec"] == folder
    assert "perplexity" in capsys.readouterr().out
    # lm-eval's own results beside eval.json, in lm-eval's shape
    lm_eval = json.loads((out.parent / "eval.lm_eval.json").read_text())
    assert set(lm_eval["results"]) == {"miopt_facts_mc", "miopt_arithmetic"} and "n-shot" in lm_eval
    assert data["tasks"]["miopt_arithmetic"]["items"]["doc_id"] == [0, 1]

    cmp_dir = tmp_path / "cmp"
    # a run folder holding eval.json, and the same model evaluated on the fly with the same settings
    assert main(["compare", str(out.parent), folder, "--labels", "base,again", "--out", str(cmp_dir), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "metric" in printed and "base" in printed and "again" in printed
    table = json.loads((cmp_dir / "compare.json").read_text())
    rows = {r["metric"]: r for r in table["rows"]}
    assert rows["perplexity"]["vs_baseline"]["again"] == pytest.approx(0.0, abs=1e-9)
    assert rows["miopt_facts_mc acc"]["vs_baseline"]["again"] == 0
    # the same model twice: paired tests run and find nothing
    assert rows["perplexity"]["paired"]["again"]["significant"] is False
    assert rows["miopt_facts_mc acc"]["paired"]["again"]["p_value"] == 1.0
    assert (cmp_dir / "compare.md").read_text().startswith("| metric | base | again |")
    assert (cmp_dir / "pareto.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, match", [
    (["eval", "/no/such/model"], "does not exist"),
    (["eval", "not-a-bundled-name"], "unknown model name"),
    (["eval", "FOLDER", "--tasks", "miopt_capitalz"], "unknown task"),
    (["eval", "FOLDER", "--parts", "perplexity,vibes"], "unknown evaluation part"),
    (["compare", "missing/eval.json", "FOLDER"], "does not exist"),
    (["compare", "a.json", "b.json", "--labels", "x"], "one per item"),
])
def test_bad_inputs_give_one_clear_error(folder, tmp_path, capsys, argv, match):
    argv = [folder if a == "FOLDER" else a for a in argv] + ["--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert match in err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_broken_model_folder(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": "lots"}')
    assert main(["eval", str(bad), "--out", str(tmp_path / "e.json")]) == 2
    assert "could not load model" in capsys.readouterr().err


def test_eval_of_a_task_file_whose_template_runs_code(folder, tmp_path, capsys):
    import shutil

    import yaml

    from mi_opt.evaluate.tasks import TASK_DIR

    pwned = tmp_path / "PWNED_FILE"
    config = yaml.safe_load((TASK_DIR / "arithmetic.yaml").read_text())
    for name in config["dataset_kwargs"]["data_files"].values():
        shutil.copy(TASK_DIR / name, tmp_path / name)
    config.update(task="evil", doc_to_text=f"{{{{ cycler.__init__.__globals__.os.system('touch {pwned}') }}}}")
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "eval.json"
    code = main(["eval", folder, "--out", str(out), "--parts", "tasks", "--tasks", str(tmp_path / "evil.yaml"),
                 "--limit", "2"])
    assert code == 2 and not pwned.exists() and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mi-opt eval: error:") and "reaches Python internals" in err and "--trust-task-code" in err


def test_compare_models_times_them_together(folder, tmp_path, capsys):
    cmp_dir = tmp_path / "ab"
    argv = ["compare", folder, folder, "--labels", "a,b", "--out", str(cmp_dir), *SMALL]
    assert main([*argv[:-len(SMALL)], *SMALL, "--parts", "speed"]) == 0
    data = json.loads((cmp_dir / "compare.json").read_text())
    assert data["speed_ab"]["labels"] == ["a", "b"] and data["speed_ab"]["rounds"] == 2
    assert any("interleaved rounds" in n for n in data["notes"])
    assert "timing a, b together" in capsys.readouterr().out
