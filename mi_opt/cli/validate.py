"""`mi-opt validate RECIPE ...`: check recipes without loading a model.

First the recipe itself (keys, types, ranges, plug-in names: recipe.py), then what it names
(model, text sources, tasks, budgets against the model's config.json: preflight.py).
"""
from __future__ import annotations

import argparse

from mi_opt.cli.eval import add_trust_arguments
from mi_opt.errors import MiOptError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipes", nargs="+", help="recipe YAML files")
    add_trust_arguments(p, task_code=True)  # the same opt-ins as `run`, so a file run accepts validates


def run(args: argparse.Namespace) -> int:
    from mi_opt.preflight import check_recipe
    from mi_opt.recipe import load_recipe

    for path in args.recipes:
        recipe = load_recipe(path)
        try:
            shape = check_recipe(recipe, trust_task_code=args.trust_task_code)
        except MiOptError as err:
            raise MiOptError(f"{path}: {err}") from None
        checked = f"; budget checked against {shape.n_layers} layers, {shape.n_heads} heads" if shape else ""
        print(f"{path}: ok ({recipe.name}: scorer {recipe.profile.scorer}, planner {recipe.policy.planner}, "
              f"model {recipe.model.name}{checked})")
    return 0
