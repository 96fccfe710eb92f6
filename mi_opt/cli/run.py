"""`mi-opt run RECIPE [RECIPE ...]`: the whole pipeline; several recipes also get a comparison."""
from __future__ import annotations

import argparse
from pathlib import Path

from mi_opt.cli.eval import add_trust_arguments
from mi_opt.errors import MiOptError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipes", nargs="+", help="recipe YAML files (see recipes/)")
    p.add_argument("--out", default="runs", help="parent folder: each recipe runs in OUT/<recipe name>")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_trust_arguments(p, task_code=True)  # a flag, never a recipe key: recipes are shared files


def run(args: argparse.Namespace) -> int:
    from mi_opt.recipe import load_recipe
    from mi_opt.run import run as run_recipe
    from mi_opt.run import run_folder

    _threads(args.threads)
    recipes = [load_recipe(r) for r in args.recipes]  # all validated before any work starts
    folders = [run_folder(args.out, r.name) for r in recipes]
    results = []
    for recipe, folder in zip(recipes, folders):
        result = run_recipe(recipe, folder, trust_remote_code=args.trust_remote_code,
                            trust_task_code=args.trust_task_code)
        print(f"{recipe.name}: ran {', '.join(result.stages_run) or 'nothing'}; "
              f"reused {', '.join(result.stages_reused) or 'nothing'}\n  report: {result.report}")
        results.append(result)
    if len(results) > 1:
        from mi_opt.cli.compare_recipes import compare_runs

        compare_runs([r.folder for r in results], Path(args.out) / "comparison")
    return 0


def _threads(n: int | None) -> None:
    if n is not None and n < 1:
        raise MiOptError(f"--threads must be >= 1 (got {n}); leave it out for torch's choice")
    if n:
        import torch

        torch.set_num_threads(n)
