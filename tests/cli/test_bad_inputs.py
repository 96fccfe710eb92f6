"""Malformed inputs end in one line, exit code 2, and nothing written (issue 12's list)."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml
from tiny import save_tiny, tiny_model, tiny_windows

from mi_opt.cli import main


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid profile and plan of the tiny model, as plain data to break."""
    from mi_opt.policy import make_plan
    from mi_opt.profile.scorers import run_scorer

    model = tiny_model()
    profile = run_scorer("block_influence", model, tiny_windows(4, 16), {"unit_kinds": ("layer",)}, progress=False)
    plan = make_plan(profile, "layer-skip", {"n_drop": 1}, model)
    return json.loads(json.dumps(profile.to_dict())), json.loads(json.dumps(plan.to_dict()))


def _profile(p):
    p["scores"]["L99"] = p["scores"]["L1"]
    return p


CASES = {
    "non-UTF-8 recipe": ("recipe", b"name: caf\xe9\n", ["validate"], "not UTF-8 text"),
    "duplicate recipe key": ("recipe", b"name: a\nname: b\n", ["validate"], "key 'name' is given twice"),
    "negative threads": ("recipe", b"name: a\n", ["run", "--threads", "-1"], "--threads must be >= 1"),
    "profile is a list": ("profile", lambda p: [p], ["plan"], "holds a JSON list"),
    "profile lacks scores": ("profile", lambda p: {k: v for k, v in p.items() if k != "scores"}, ["plan"],
                             "needs a 'model' object and a 'scores' object"),
    "score is a string": ("profile", lambda p: {**p, "scores": {**p["scores"], "L1": {**p["scores"]["L1"],
                                                                 "delta_loss": "high"}}}, ["plan"],
                          "unit L1: delta_loss must be a number"),
    "profile version -5": ("profile", lambda p: {**p, "version": -5}, ["plan"], "has version -5"),
    "profile version missing": ("profile", lambda p: {k: v for k, v in p.items() if k != "version"}, ["plan"],
                                "has version None"),
    "unit L99 in 4 layers": ("profile", _profile, ["plan"], "unit L99 is outside the profiled model's 4 layers"),
    "plan version 0": ("plan", lambda p: {**p, "version": 0}, ["apply"], "has version 0"),
    "plan null fingerprint": ("plan", lambda p: {**p, "model": {**p["model"], "fingerprint": None}},
                              ["apply"], "records no model fingerprint"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, good, tmp_path, capsys):
    kind, content, verb, message = CASES[case]
    path = tmp_path / f"input.{'yaml' if kind == 'recipe' else 'json'}"
    if kind == "recipe":
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content(json.loads(json.dumps(good[0 if kind == "profile" else 1])))))
    out = tmp_path / "out"
    argv = {"validate": ["validate", str(path)], "run": [*verb, str(path), "--out", str(out)],
            "plan": ["plan", str(path), "--out", str(out / "plan.json")],
            "apply": ["apply", "no-model-needed", str(path), "--out", str(out)]}[verb[0]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mi-opt {verb[0]}: error:") and message in err[0], err
    assert not out.exists()


def _truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return str(folder), "kjv"


def _latin1_text(folder):
    (folder.parent / "latin1.txt").write_bytes("café au lait ".encode("latin1") * 200)
    return str(folder), str(folder.parent / "latin1.txt")


def _latin1_jsonl(folder):
    (folder.parent / "latin1.jsonl").write_bytes(json.dumps({"text": "x"}).encode() + b"\n" +
                                                 '{"text": "café"}'.encode("latin1") + b"\n")
    return str(folder), str(folder.parent / "latin1.jsonl")


def _hf_offline(folder):
    return str(folder), "hf:wikitext:wikitext-2-raw-v1:train"  # conftest makes the hub unreachable


# case -> (how to break a copy of a tiny model folder or its data: returns (model, text source), verb, words)
MODEL_CASES = {
    "corrupt safetensors, profile": (_truncate_weights, "profile", ["safetensors file is corrupt or truncated"]),
    "corrupt safetensors, run": (_truncate_weights, "run", ["safetensors file is corrupt or truncated"]),
    "non-UTF-8 .txt, profile": (_latin1_text, "profile", ["latin1.txt is not UTF-8", "iconv"]),
    "non-UTF-8 .txt, run": (_latin1_text, "run", ["latin1.txt is not UTF-8"]),
    "non-UTF-8 .jsonl, profile": (_latin1_jsonl, "profile", ["latin1.jsonl is not UTF-8"]),
    "hf: offline, profile": (_hf_offline, "profile", ["could not load 'hf:wikitext", "need a network"]),
    "hf: offline, run": (_hf_offline, "run", ["could not load 'hf:wikitext", "need a network"]),
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _argv(verb: str, model: str, source: str, tmp_path, out) -> list[str]:
    if verb == "profile":
        return ["profile", model, "--data", source, "--n-samples", "2", "--seq-len", "8", "--units", "layer",
                "--out", str(out)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "model": {"name": model},
                                      "data": {"calibration": source, "n_samples": 2, "seq_len": 8},
                                      "profile": {"scorer": "block_influence"},
                                      "policy": {"planner": "layer-skip", "options": {"n_drop": 1}},
                                      "evaluate": {"parts": ["perplexity"], "ppl_samples": 1, "ppl_seq_len": 8}}))
    return ["run", str(recipe), "--out", str(out)]


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_or_data_is_one_line_and_writes_nothing(case, tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MI_OPT_CACHE", str(tmp_path / "cache"))
    breaks, verb, words = MODEL_CASES[case]
    model, source = breaks(shutil.copytree(tiny_folder, tmp_path / "model"))
    out = tmp_path / "out"
    assert main(_argv(verb, model, source, tmp_path, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar, if any
    assert err.startswith(f"mi-opt {verb}: error:") and all(w in err for w in words), err
    assert not out.exists() and not (tmp_path / "cache").exists()
