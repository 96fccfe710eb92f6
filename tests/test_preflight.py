"""`mi-opt validate` checks what a recipe names, without loading a model (issue 12)."""
from __future__ import annotations

import json

import pytest
import yaml

from mi_opt.cli import main
from mi_opt.models import BUNDLED, BundledModel

TINY = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}  # tests/tiny.py's shape


def _layer_skip(**options):
    return {"policy": {"planner": "layer-skip", "options": options}}


def _head_prune(**options):
    return {"policy": {"planner": "head-prune", "options": options}}


# case -> (recipe sections over a model folder holding only TINY's config.json, key, words of the message)
BAD = {
    "missing model folder": ({"model": {"name": "/no/such/model"}}, "model.name", "does not exist"),
    "folder without config": ({"model": {"name": "{empty}"}}, "model.name", "has no config.json"),
    "missing gguf": ({"model": {"name": "/no/such/model.gguf"}}, "model.name", "GGUF file"),
    "unknown bundled name": ({"model": {"name": "smollm3"}}, "model.name", "unknown model name 'smollm3'"),
    "bundled, not installed": ({"model": {"name": "fake-bundled"}}, "model.name",
                               "not installed; run: pip install fake-bundled"),
    "missing corpus file": ({"data": {"calibration": "/no/such.txt"}}, "data.calibration", "unknown text source"),
    "unknown part of a mix": ({"data": {"calibration": "handbook+kjb"}}, "data.calibration", "'kjb'"),
    "unknown synthetic kind": ({"data": {"calibration": "synthetic:algebra"}}, "data.calibration",
                               "unknown synthetic corpus"),
    "repeat of a missing file": ({"data": {"calibration": "repeat:/no/such.txt"}}, "data.calibration",
                                 "unknown text source"),
    "hf source without split": ({"data": {"calibration": "hf:wikitext"}}, "data.calibration", "hf:NAME:SPLIT"),
    "missing evaluation text": ({"evaluate": {"text_source": "/no/eval.jsonl"}}, "evaluate.text_source",
                                "unknown text source"),
    "missing heal source": ({"heal": {"source": "/no/heal.txt"}}, "heal.source", "unknown text source"),
    "missing task file": ({"evaluate": {"tasks": ["/no/task.yaml"]}}, "evaluate.tasks", "does not exist"),
    "unknown task name": ({"evaluate": {"tasks": ["miopt_no_such_task"]}}, "evaluate.tasks", "unknown task"),
    "drop every layer": (_layer_skip(n_drop=4, protect_first=0, protect_last=0), "policy.options.n_drop",
                         "would drop every one of the model's 4 layers"),
    "drop the protected layers": (_layer_skip(n_drop=3), "policy.options.n_drop", "only 2 of the model's 4"),
    "prune every head": (_head_prune(fraction=0.9, mode="free"), "policy.options.fraction",
                         "would leave a layer with none"),
    "uniform, not a multiple": (_head_prune(n_heads=3), "policy.options.n_heads", "not a multiple of 4"),
    "combined drops every layer": ({"policy": {"planner": "combined", "options": {
        "layer_skip": {"n_drop": 5, "protect_first": 0, "protect_last": 0}}}},
        "policy.options.layer_skip.n_drop", "drop every one"),
    "combined prunes every head left": ({"policy": {"planner": "combined", "options": {
        "layer_skip": {"n_drop": 2}, "head_prune": {"n_heads": 7, "mode": "free"}}}},
        "policy.options.head_prune.n_heads", "removing 7 of 8 heads"),
}

GOOD = {
    "hub id": {"model": {"name": "HuggingFaceTB/SmolLM2-135M"}},
    "mixed, repeated and synthetic text": {"data": {"calibration": "handbook+repeat:kjv+synthetic:arithmetic"}},
    "hf source": {"data": {"calibration": "hf:wikitext:wikitext-2-raw-v1:train"}},
    "local text file": {"evaluate": {"text_source": "{text}"}},
    "possible budgets": {"policy": {"planner": "combined", "options": {
        "layer_skip": {"n_drop": 2}, "head_prune": {"fraction": 0.5}}}},
}


@pytest.fixture
def folders(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.txt").write_text("some text\n")
    monkeypatch.setitem(BUNDLED, "fake-bundled", BundledModel("fake-bundled", "fake-bundled",
                                                               "pip install fake-bundled", "", lambda: None))
    return tmp_path


def _recipe(folders, sections: dict) -> str:
    data = {"name": "v", "model": {"name": str(folders / "model")},
            "policy": {"planner": "layer-skip", "options": {"n_drop": 1}},
            "evaluate": {"tasks": ["miopt_facts_mc"]}}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    text = yaml.safe_dump(data).replace("{empty}", str(folders / "empty")).replace("{text}", str(folders / "text.txt"))
    path = folders / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", list(BAD))
def test_validate_names_the_key_of_what_does_not_resolve(case, folders, capsys):
    sections, key, words = BAD[case]
    path = _recipe(folders, sections)
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mi-opt validate: error: {path}: {key}: ") and words in err[0], err
    assert sorted(p.name for p in folders.iterdir()) == ["empty", "model", "recipe.yaml", "text.txt"]


@pytest.mark.parametrize("case", list(GOOD))
def test_validate_passes_what_can_resolve(case, folders, capsys):
    path = _recipe(folders, GOOD[case])
    assert main(["validate", path]) == 0, capsys.readouterr().err
    assert f"{path}: ok" in capsys.readouterr().out
