"""`mi-opt compare A B ...`: a table of every metric against the first (baseline) column, and a
Pareto plot. Each argument is an eval.json file or a model (evaluated with the settings given)."""
from __future__ import annotations

import argparse
import gc
from pathlib import Path

from mi_opt.errors import MiOptError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mi_opt.cli.eval import add_eval_arguments

    p.add_argument("items", nargs="+", help="eval.json files (or run folders holding one) and/or models "
                   "(bundled name, folder, exported checkpoint); the first is the baseline")
    p.add_argument("--labels", default=None, help="comma list of column names (default: from the paths)")
    p.add_argument("--out", default="runs/compare", help="folder for compare.md, compare.json, pareto.png")
    p.add_argument("--save-evals", action="store_true", help="also write eval-<label>.json for models evaluated here")
    p.add_argument("--no-ab", action="store_true",
                   help="do not keep the models given here loaded for an interleaved A/B speed timing "
                        "(saves memory; speed rows then come from separate runs)")
    add_eval_arguments(p)


def _eval_file(item: str) -> Path | None:
    """The eval.json an item names: the file itself, or a run folder holding one (not a model)."""
    path = Path(item)
    if path.suffix == ".json":
        return path
    if path.is_dir() and (path / "eval.json").is_file() and not (path / "config.json").is_file():
        return path / "eval.json"
    return None


def _label(item: str) -> str:
    path = _eval_file(item) or Path(item)
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
    from mi_opt.cli.eval import config_from_args, evaluate_loaded
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
    results: list = [EvalResult.load(f) if (f := _eval_file(i)) else None for i in args.items]
    config = config_from_args(args) if None in results else None
    # Speed is timed A/B (the models given here together, interleaved) when the baseline is one of
    # them: the models stay loaded until then.
    want_ab = not args.no_ab and config is not None and "speed" in config.parts and results[0] is None
    ab_models = {}
    for i, item in enumerate(args.items):
        if results[i] is None:
            print(f"evaluating {item} ...")
            results[i], model = evaluate_loaded(item, args, config)
            if want_ab:
                ab_models[labels[i]] = model
            del model
            gc.collect()  # release a model not kept for the A/B timing before the next one is loaded
            if args.save_evals:
                print(f"eval: {results[i].save(out / f'eval-{labels[i]}.json')}")
    speed_ab = _speed_ab(ab_models, config, args) if ab_models and len(ab_models) > 1 else None
    comparison = Comparison(labels, results, speed_ab=speed_ab)
    paths = comparison.write(out)
    print(comparison.to_text())
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if sum(r is None for r in (_eval_file(i) for i in args.items)) > 1:
        print("note: several models were evaluated in this one process; CPU peak memory (process RSS) of later "
              "ones may include memory the allocator kept from earlier ones. For memory figures, run "
              "`mi-opt eval` per model and compare the eval.json files.")
    return 0


def _speed_ab(models: dict, config, args: argparse.Namespace) -> dict:
    from mi_opt.evaluate.ab_speed import measure_ab

    print(f"timing {', '.join(models)} together (interleaved A/B rounds) ...")
    device = None if args.device == "auto" else args.device
    return measure_ab(models, config.speed, device, threads=config.threads)
