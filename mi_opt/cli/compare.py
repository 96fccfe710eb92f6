"""`mi-opt compare A B ...`: a table of every metric against the first (baseline) column, and a
Pareto plot. Each argument is an eval.json file or a model (evaluated with the settings given)."""
from __future__ import annotations

import argparse
from pathlib import Path

from mi_opt.errors import MiOptError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mi_opt.cli.eval import add_eval_arguments

    p.add_argument("items", nargs="+", help="eval.json files and/or models (bundled name, folder, checkpoint); "
                   "the first is the baseline")
    p.add_argument("--labels", default=None, help="comma list of column names (default: from the paths)")
    p.add_argument("--out", default="runs/compare", help="folder for compare.md, compare.json, pareto.png")
    p.add_argument("--save-evals", action="store_true", help="also write eval-<label>.json for models evaluated here")
    add_eval_arguments(p)


def _label(item: str) -> str:
    path = Path(item)
    if path.suffix == ".json":  # runs/a/eval.json -> "a"; base.json -> "base"
        return path.parent.name if path.stem == "eval" and path.parent.name else path.stem
    return path.name or item


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return out


def run(args: argparse.Namespace) -> int:
    from mi_opt.cli.eval import config_from_args, evaluate_spec
    from mi_opt.evaluate.compare import Comparison
    from mi_opt.evaluate.result import EvalResult

    if args.labels:
        labels = [x.strip() for x in args.labels.split(",")]
        if len(labels) != len(args.items):
            raise MiOptError(f"--labels has {len(labels)} names for {len(args.items)} items; give one per item")
    else:
        labels = _unique([_label(i) for i in args.items])
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MiOptError(f"--out {out} exists and is not a folder")
    # Read every eval.json first: a typo in the last one should not cost the evaluations before it.
    results: list = [EvalResult.load(i) if i.endswith(".json") else None for i in args.items]
    config = config_from_args(args) if None in results else None
    for i, item in enumerate(args.items):
        if results[i] is None:
            print(f"evaluating {item} ...")
            results[i] = evaluate_spec(item, args, config)
            if args.save_evals:
                print(f"eval: {results[i].save(out / f'eval-{labels[i]}.json')}")
    comparison = Comparison(labels, results)
    paths = comparison.write(out)
    print(comparison.to_text())
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
