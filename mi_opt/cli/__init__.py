"""`mi-opt` command line: one module per verb, each exposing add_parser(sub) and run(args)."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from mi_opt.errors import MiOptError

# verb -> module under mi_opt.cli; each module defines add_arguments(parser) and run(args) -> int.
VERBS = {
    "models": "Bundled models and what is cached.",
    "profile": "Score every unit by causal ablation; writes profile.json and plots.",
    "plan": "Turn a profile and a budget into plan.json (layers to drop, heads to prune, bits).",
    "apply": "Apply plan.json to the model for real and export a verified checkpoint.",
    "heal": "Distill a compressed checkpoint back toward its original model; export it verified.",
    "eval": "Perplexity, benchmark tasks and speed of one model; writes eval.json.",
    "compare": "Table and Pareto plot of eval.json files and/or models against the first.",
    "run": "Run recipes end to end: profile, plan, evaluate, apply, evaluate, export, report.",
    "compare-recipes": "Run several recipes on the same model and data; one table and Pareto plot.",
    "validate": "Check recipe files without loading a model.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mi-opt", description="Compress language models by "
                                     "locating what matters with causal experiments.")
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb, help_text in VERBS.items():
        module = importlib.import_module(f"mi_opt.cli.{verb.replace('-', '_')}")
        p = sub.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def _terminated(signum, frame):
    # SIGTERM is what timeout, Slurm and Kubernetes send: unwind like Ctrl-C, so temporaries
    # are removed by the same `finally` blocks instead of being left behind.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signals only work there
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    try:
        return int(args.handler(args) or 0)
    except MiOptError as err:
        print(f"mi-opt {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mi-opt {args.verb}: interrupted; finished outputs are kept, nothing half-written", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
