"""`mi-opt models`: bundled model names, whether installed, and what is cached."""
from __future__ import annotations

import argparse

from mi_opt.models import cache_dir, list_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    print(f"cache: {cache_dir()}  (override with $MI_OPT_CACHE)")
    for row in list_models():
        state = ("cached" if row["cached"] else "installed, converts on first use") if row["installed"] \
            else f"not installed: {row['install']}"
        print(f"  {row['name']:<14} {state}\n      {row['description']}")
    return 0
