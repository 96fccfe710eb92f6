"""`mi-opt validate RECIPE ...`: check recipes (keys, types, ranges, plug-in names) without a model."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipes", nargs="+", help="recipe YAML files")


def run(args: argparse.Namespace) -> int:
    from mi_opt.recipe import load_recipe

    for path in args.recipes:
        recipe = load_recipe(path)
        print(f"{path}: ok ({recipe.name}: scorer {recipe.profile.scorer}, planner {recipe.policy.planner}, "
              f"model {recipe.model.name})")
    return 0
