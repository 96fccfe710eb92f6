import json
import shutil

import pytest
import yaml

from mi_opt.errors import MiOptError
from mi_opt.evaluate.config import DEFAULT_TASKS
from mi_opt.evaluate.tasks import TASK_DIR, local_tasks, read_task_file, resolve_tasks, run_tasks


def test_shipped_tasks_are_complete_and_answers_are_correct():
    tasks = local_tasks()
    assert set(DEFAULT_TASKS) <= set(tasks)
    kinds = {read_task_file(tasks[n])["output_type"] for n in DEFAULT_TASKS}
    assert kinds == {"multiple_choice", "generate_until"}
    for name, path in tasks.items():
        config = read_task_file(path)
        rows = [json.loads(line) for line in open(config["dataset_kwargs"]["data_files"]["test"])]
        # generative tasks: enough items for a standard error near 0.03; multiple choice has 60
        assert len(rows) >= (60 if config["output_type"] == "multiple_choice" else 190), name
    for row in map(json.loads, open(TASK_DIR / "arithmetic.jsonl")):
        assert int(row["answer"]) == row["a"] + row["b"]
    for row in map(json.loads, open(TASK_DIR / "facts_mc.jsonl")):
        assert len(row["choices"]) == 4 == len(set(row["choices"])) and 0 <= row["answer"] < 4
    few = {json.dumps(r) for r in map(json.loads, open(TASK_DIR / "capitals_fewshot.jsonl"))}
    assert not few & {json.dumps(r) for r in map(json.loads, open(TASK_DIR / "capitals.jsonl"))}


def test_local_task_runs_offline_on_a_tiny_model(smol_tiny, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = smol_tiny
    out = run_tasks(model, tok, ["miopt_facts_mc", "miopt_capitals"], limit=3, batch_size=4)
    mc, gen = out["miopt_facts_mc"], out["miopt_capitals"]
    assert mc["primary"] == "acc" and 0.0 <= mc["metrics"]["acc"] <= 1.0 and mc["n"] == 3
    assert gen["primary"] == "exact_match" and gen["num_fewshot"] == 3 and gen["n"] == 3
    assert gen["output_type"] == "generate_until" and len(gen["examples"]) == 3
    assert "Question: What is the capital of" in gen["examples"][0]["prompt_end"]
    # greedy decoding is deterministic: the same model gives the same generations
    again = run_tasks(model, tok, ["miopt_capitals"], limit=3, batch_size=2)["miopt_capitals"]
    assert [e["response"] for e in again["examples"]] == [e["response"] for e in gen["examples"]]


def test_an_evaluation_cut_short_resumes_at_the_task_it_stopped_in(tmp_path, smol_tiny, monkeypatch):
    import mi_opt.evaluate.tasks as tasks

    model, tok = smol_tiny
    names = ["miopt_facts_mc", "miopt_capitals"]
    whole_raw, kept_raw = {}, {}
    whole = run_tasks(model, tok, names, limit=3, batch_size=2, raw=whole_raw)
    real, calls = tasks._lm_eval, []

    def dies_on_the_second_task(lm, specs, *args):
        calls.append(specs[0]["task"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the session ends in the middle of capitals
        return real(lm, specs, *args)

    monkeypatch.setattr(tasks, "_lm_eval", dies_on_the_second_task)
    with pytest.raises(KeyboardInterrupt):
        run_tasks(model, tok, names, limit=3, batch_size=2, resume_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1             # facts was kept, capitals was not
    monkeypatch.setattr(tasks, "_lm_eval", lambda lm, specs, *a: (calls.append(specs[0]["task"]), real(lm, specs, *a))[1])
    resumed = run_tasks(model, tok, names, limit=3, batch_size=2, resume_dir=tmp_path, raw=kept_raw)
    assert calls[2:] == ["miopt_capitals"]                     # only the unfinished task ran again
    for name in names:
        assert resumed[name]["items"] == whole[name]["items"] and resumed[name]["metrics"] == whole[name]["metrics"]
    assert set(kept_raw["results"]) == set(whole_raw["results"]) == set(names)   # lm-eval's tables, joined
    assert set(kept_raw["configs"]) == set(names) and kept_raw["n-shot"] == whole_raw["n-shot"]
    # another limit is another evaluation: nothing kept is reused for it
    run_tasks(model, tok, names[:1], limit=2, batch_size=2, resume_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_task_yaml_path_with_relative_data(tmp_path, smol_tiny):
    shutil.copy(TASK_DIR / "facts_mc.jsonl", tmp_path / "data.jsonl")
    config = yaml.safe_load((TASK_DIR / "facts_mc.yaml").read_text())
    config["task"] = "my_facts"
    config["dataset_kwargs"]["data_files"] = {"test": "data.jsonl"}
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    model, tok = smol_tiny
    out = run_tasks(model, tok, [str(tmp_path / "my.yaml")], limit=2)
    assert out["my_facts"]["n"] == 2


def test_unknown_task_lists_the_shipped_ones():
    with pytest.raises(MiOptError) as err:
        resolve_tasks(["miopt_capitalz"])
    assert "miopt_capitals" in str(err.value) and "Did you mean" in str(err.value)


@pytest.mark.parametrize("drop, expect", [("doc_to_text", "doc_to_text"), ("doc_to_choice", "doc_to_choice"),
                                          ("test_split", "test_split"), ("task", "task")])
def test_task_file_missing_fields(tmp_path, drop, expect):
    config = yaml.safe_load((TASK_DIR / "facts_mc.yaml").read_text())
    del config[drop]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(MiOptError, match=f"lacks required field.*{expect}"):
        read_task_file(path)


def test_task_file_other_mistakes(tmp_path):
    with pytest.raises(MiOptError, match="does not exist"):
        read_task_file(tmp_path / "none.yaml")
    config = yaml.safe_load((TASK_DIR / "facts_mc.yaml").read_text())
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(config))  # data file not copied next to it
    with pytest.raises(MiOptError, match="data file"):
        read_task_file(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({**config, "output_type": "essay"}))
    with pytest.raises(MiOptError, match="output_type"):
        read_task_file(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("- just\n- a list\n")
    with pytest.raises(MiOptError, match="mapping"):
        read_task_file(tmp_path / "c.yaml")


def _user_task(tmp_path, **fields) -> str:
    """A copy of the shipped arithmetic task in tmp_path (outside the package), with fields replaced."""
    config = yaml.safe_load((TASK_DIR / "arithmetic.yaml").read_text())
    for name in ("arithmetic.jsonl", "arithmetic_fewshot.jsonl"):
        shutil.copy(TASK_DIR / name, tmp_path / name)
    config.update(task="user_arithmetic", **fields)
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_task_template_cannot_run_code(smol_tiny, tmp_path):
    pwned = tmp_path / "PWNED_FILE"
    evil = _user_task(tmp_path, doc_to_text=f"{{{{ cycler.__init__.__globals__.os.system('touch {pwned}') }}}}")
    model, tok = smol_tiny
    with pytest.raises(MiOptError, match="reaches Python internals.*--trust-task-code"):
        run_tasks(model, tok, [evil], limit=2, batch_size=2)
    assert not pwned.exists()
    import lm_eval.utils
    from jinja2.sandbox import SandboxedEnvironment

    assert not isinstance(lm_eval.utils.env, SandboxedEnvironment)  # lm-eval's own environment is back


def test_a_user_task_with_safe_templates_runs_in_the_sandbox(smol_tiny, tmp_path):
    model, tok = smol_tiny
    plain = run_tasks(model, tok, ["miopt_arithmetic"], limit=2, batch_size=2)["miopt_arithmetic"]
    user = run_tasks(model, tok, [_user_task(tmp_path)], limit=2, batch_size=2)["user_arithmetic"]
    assert user["metrics"] == plain["metrics"] and user["examples"][0]["prompt_end"] == plain["examples"][0]["prompt_end"]


def test_function_tags_import_code_only_when_trusted(tmp_path):
    ran = tmp_path / "IMPORTED"
    (tmp_path / "evil.py").write_text(f"open({str(ran)!r}, 'w').close()\ndef text(doc):\n    return 'x'\n")
    path = _user_task(tmp_path)
    path_text = open(path).read().replace("doc_to_text:", "doc_to_text: !function evil.text\nold_text:")
    open(path, "w").write(path_text)
    with pytest.raises(MiOptError, match=r"!function evil.text` would import and run Python code"):
        resolve_tasks([path])
    assert not ran.exists()
    config = read_task_file(path, trust_code=True)
    assert callable(config["doc_to_text"]) and ran.exists()
