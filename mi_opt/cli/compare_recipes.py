"""`mi-opt compare-recipes R1 R2 ...`: run recipes on the same model and data, one table and plot."""
from __future__ import annotations

import argparse
from pathlib import Path

from mi_opt.cli.eval import add_trust_arguments
from mi_opt.errors import MiOptError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipes", nargs="+", help="recipe YAML files")
    p.add_argument("--out", default="runs", help="parent folder of the runs; the comparison goes to OUT/comparison")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_trust_arguments(p, task_code=True)


def compare_runs(folders: list[Path], out: Path) -> dict:
    """One Comparison of the shared original and every run's compressed model."""
    from mi_opt.evaluate import EvalResult
    from mi_opt.evaluate.compare import Comparison

    from mi_opt.artifacts import read_json
    from mi_opt.evaluate.ab_speed import SCHEMA, VERSION, merge_runs

    base = EvalResult.load(folders[0] / "eval_original.json")
    labels, results = ["original"], [base]
    for folder in folders:
        labels.append(folder.name)
        results.append(EvalResult.load(folder / "eval_compressed.json"))
    # Each run timed its model beside a fresh original: its speedup comes from those rounds.
    speed = {f.name: read_json(f / "speed_ab.json", SCHEMA, VERSION) if (f / "speed_ab.json").is_file() else None
             for f in folders}
    comparison = Comparison(labels, results, speed_ab=merge_runs("original", speed))
    paths = comparison.write(out)
    print(comparison.to_text())
    print(f"comparison: {paths['markdown']}  plot: {paths['plot']}")
    return paths


def run(args: argparse.Namespace) -> int:
    from mi_opt.cli.run import _threads
    from mi_opt.recipe import load_recipe
    from mi_opt.run import run as run_recipe
    from mi_opt.run import run_folder

    _threads(args.threads)
    recipes = [load_recipe(r) for r in args.recipes]
    shared = {(r.model.name, r.model.dtype, repr(r.evaluate)) for r in recipes}
    if len(shared) > 1:
        raise MiOptError("compare-recipes needs every recipe on the same model, dtype and evaluate section, "
                         f"so their numbers compare; got {len(shared)} different settings")
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise MiOptError(f"recipe names must differ (each runs in its own folder): {names}")
    paths = [run_folder(args.out, r.name) for r in recipes]
    folders = [run_recipe(r, path, trust_remote_code=args.trust_remote_code, trust_task_code=args.trust_task_code).folder
               for r, path in zip(recipes, paths)]
    compare_runs(folders, Path(args.out) / "comparison")
    return 0
