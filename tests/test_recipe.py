from pathlib import Path

import pytest
import yaml

from mi_opt.cli import main
from mi_opt.errors import MiOptError
from mi_opt.recipe import EvalConfig, PolicySection, Recipe, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_shipped_recipes_exist_and_validate():
    names = {p.stem for p in RECIPES}
    assert {"default", "drop-quarter-layers", "prune-third-heads", "bits-4-8-mix", "combined",
            "task-aware-arithmetic"} <= names
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.name == path.stem
        assert path.read_text().startswith("#")  # each says what it is for


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_yaml_round_trip(path):
    recipe = load_recipe(path)
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe and again.to_yaml() == recipe.to_yaml()


def test_python_recipe_equals_yaml():
    recipe = Recipe(name="py", policy=PolicySection(planner="layer-skip", options={"n_drop": 2}),
                    evaluate=EvalConfig(task_limit=5))
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


@pytest.mark.parametrize("data,message", [
    ({"name": "x", "modle": {}}, "unknown key modle"),
    ({"name": "x", "data": {"n_sample": 4}}, "unknown key data.n_sample"),
    ({"name": "x", "data": {"n_samples": "many"}}, "data.n_samples: expected int"),
    ({"name": "x", "data": {"n_samples": 0}}, "data: n_samples must be >= 1"),
    ({"name": "x", "model": {"dtype": "fp8"}}, "model: dtype must be fp32, bf16 or fp16"),
    ({"name": "x", "evaluate": {"speed": {"repetitions": 0}}}, "evaluate.speed: speed repetitions must be >= 1"),
    ({"name": "x", "evaluate": {"parts": ["vibes"]}}, "unknown evaluation part"),
    ({"name": "x", "profile": {"scorer": "ablaton"}}, "Did you mean 'ablation'"),
    ({"name": "x", "profile": {"options": {"ablation": "resample"}}}, "profile.options: ablation must be one of"),
    ({"name": "x", "policy": {"planner": "layer-skip", "options": {"n_dorp": 3}}}, "policy.options: unknown"),
    ({"name": "x", "export": {"enabled": "yes"}}, "export.enabled: expected bool"),
    ({"description": "no name"}, "missing required key 'name'"),
])
def test_bad_recipes_name_the_key(data, message):
    with pytest.raises(MiOptError, match=message):
        recipe_from_dict(data)


def test_validate_verb(tmp_path, capsys):
    assert main(["validate", str(RECIPES[0])]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\npolicy: {planner: layer-skip, options: {n_drop: -1}}\n")
    assert main(["validate", str(bad)]) == 2
    assert "policy" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    assert main(["validate", str(tmp_path / "broken.yaml")]) == 2


@pytest.mark.parametrize("name", ["/tmp/x", "../../x", "a/b", "..", "x..y", ".hidden", "_baseline", "", "a b",
                                  "comparison", "x" * 101, "a\\b", "café"])
def test_unsafe_recipe_names_are_refused(name):
    with pytest.raises(MiOptError, match="name: .* cannot name a run folder"):
        recipe_from_dict({"name": name})


@pytest.mark.parametrize("name", ["default", "drop-quarter-layers", "v1.2_run", "A" * 100])
def test_plain_recipe_names_are_accepted(name):
    policy = {"planner": "layer-skip", "options": {"n_drop": 1}}
    assert recipe_from_dict({"name": name, "policy": policy}).name == name


def test_validate_refuses_a_name_that_leaves_the_out_folder(tmp_path, capsys):
    bad = tmp_path / "escape.yaml"
    bad.write_text("name: ../../escape\n")
    assert main(["validate", str(bad)]) == 2
    assert "name: '../../escape' cannot name a run folder" in capsys.readouterr().err
