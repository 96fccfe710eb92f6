"""Recovery after compression on SmolLM2: unhealed vs local repair vs distillation, per plan.

Each cell is one plan and one way of healing it (or none). A cell heals a fresh copy of the
compressed model toward the original, then evaluates it: perplexity on the evaluation windows
of the handbook (the healing text's domain) and of the KJV (a domain healing never reads),
and every item of the five shipped tasks. Each finished cell is written to
reports/recovery/cells/<cell>.json at once, with its per-item results beside it
(<cell>.eval.json), so a killed run resumes where it stopped and the report pairs every change
on the same items and windows; the table and plots are rebuilt from whatever cells exist
(benchmarks/recovery_render.py). A cell without per-item results (made before they were kept)
is measured again.

    python benchmarks/recovery.py                  # every cell, ~2 h on 2 cores
    python benchmarks/recovery.py --cells drop7    # the cells whose name starts with drop7
    python benchmarks/recovery.py --render         # only rebuild reports/recovery.md
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch

from mi_opt.artifacts import machine, model_fingerprint, versions, write_json
from mi_opt.data import token_windows
from mi_opt.evaluate import EvalConfig, evaluate
from mi_opt.evaluate.config import DEFAULT_TASKS
from mi_opt.evaluate.paired import generative_tasks, pairable_perplexity
from mi_opt.evaluate.result import EvalResult
from mi_opt.evaluate.perplexity import perplexity
from mi_opt.heal import HealConfig, heal_
from mi_opt.models import load_model
from mi_opt.plan import CompressionPlan
from mi_opt.policy import make_plan
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.profile.scorers import SCORERS
from mi_opt.surgery import apply_

from recovery_render import render

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "reports" / "recovery"
TASKS = DEFAULT_TASKS
LOCAL = {"method": "local", "local_steps": 100, "local_windows": 32}
DISTILL = {"method": "distill", "train": "localized", "lr": 3e-4}

# plan name -> how to make it. Layer plans come from block influence (the default scorer) on
# 8 x 128 calibration tokens, or from exact causal ablation (KL) of every layer, the best
# 4-layer plan of the scorer benchmark (reports/scorers.md); the head and bits plans are the
# shipped recipes' committed plans.
PLANS = {
    "drop4": {"n_drop": 4}, "drop4-causal": {"n_drop": 4, "scorer": "ablation", "metric": "kl"},
    "drop6": {"n_drop": 6}, "drop7": {"n_drop": 7}, "drop8": {"n_drop": 8},
    "heads-third": "reports/recipes/prune-third-heads/plan.json",
    # a quarter of the heads is not a whole number per KV group: free mode, from the same recipe's profile
    "heads-quarter": {"profile": "reports/recipes/prune-third-heads/profile.json", "planner": "head-prune",
                      "options": {"fraction": 0.25, "mode": "free", "metric": "kl"}},
    "bits-mix": "reports/recipes/bits-4-8-mix/plan.json",
}
# cell name -> (plan, heal options or None)
LOCAL_DISTILL = {**DISTILL, **LOCAL, "method": "local+distill"}
# cell name -> (plan, heal options or None), in the order they run: the comparisons the issue
# asks for first, the budget and data variations after.
CELLS = {
    "drop7-unhealed": ("drop7", None),
    "drop7-local": ("drop7", LOCAL),
    "drop7-local+distill-localized-40": ("drop7", {**LOCAL_DISTILL, "steps": 40}),
    "heads-third-unhealed": ("heads-third", None),
    # every layer lost heads: 30 one-layer sites, so fewer local steps per site
    "heads-third-local": ("heads-third", {**LOCAL, "local_steps": 30}),
    "heads-third-local+distill-localized-40": ("heads-third", {**LOCAL_DISTILL, "steps": 40, "local_steps": 30}),
    # every weight trains, for about the wall time of drop7-local+distill-localized-40
    "drop7-distill-all-15": ("drop7", {"method": "distill", "train": "all", "lr": 1e-4, "steps": 15}),
    "bits-mix-unhealed": ("bits-mix", None),
    "bits-mix-distill-localized-20": ("bits-mix", {**DISTILL, "steps": 20, "lr": 1e-3}),
    # the same adapters kept unmerged: no second rounding of the quantized weights
    "bits-mix-distill-localized-20-keep": ("bits-mix", {**DISTILL, "steps": 20, "lr": 1e-3, "adapters": "keep"}),
    "drop7-distill-all-40": ("drop7", {"method": "distill", "train": "all", "lr": 1e-4, "steps": 40}),
    "drop7-distill-lora-40": ("drop7", {"method": "distill", "train": "lora", "lr": 1e-3, "steps": 40,
                                        "lora_rank": 16, "lora_alpha": 32.0}),
    "drop7-distill-all-40-self": ("drop7", {"method": "distill", "train": "all", "lr": 1e-4, "steps": 40,
                                            "self_generated": 0.5}),
    "drop7-distill-localized-40": ("drop7", {**DISTILL, "steps": 40}),
    "drop7-local+distill-localized-120": ("drop7", {**LOCAL_DISTILL, "steps": 120}),
    "drop4-unhealed": ("drop4", None),
    "drop4-local+distill-localized-20": ("drop4", {**LOCAL_DISTILL, "steps": 20}),
    "drop8-unhealed": ("drop8", None),
    "drop8-local+distill-localized-40": ("drop8", {**LOCAL_DISTILL, "steps": 40}),
    "drop4-causal-unhealed": ("drop4-causal", None),
    "drop4-causal-local+distill-localized-20": ("drop4-causal", {**LOCAL_DISTILL, "steps": 20}),
    "heads-quarter-unhealed": ("heads-quarter", None),
    "heads-quarter-local+distill-localized-40": ("heads-quarter", {**LOCAL_DISTILL, "steps": 40, "local_steps": 30}),
    "drop6-unhealed": ("drop6", None),
    "drop6-local+distill-localized-40": ("drop6", {**LOCAL_DISTILL, "steps": 40}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", nargs="*", default=[], help="run only cells whose name starts with one of these")
    p.add_argument("--render", action="store_true", help="only rebuild the report from finished cells")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def eval_config() -> EvalConfig:
    # Every task item (task_limit None); perplexity on the default recipe's evaluation windows.
    return EvalConfig(parts=("perplexity", "tasks"), text_source="handbook+kjv", ppl_samples=16, ppl_seq_len=256,
                      tasks=TASKS, task_limit=None)


def measure(model, tokenizer) -> tuple[dict, EvalResult]:
    """The cell's summary and the full evaluation (per-item results, saved beside the cell)."""
    result = evaluate(model, tokenizer, eval_config(), progress=False)
    kjv = perplexity(model, tokenizer, "kjv", 16, 256, 4, 0, False)  # a domain healing never trains on
    tasks = {name: t["metrics"][t["primary"]] for name, t in result.tasks.items()}
    summary = {"perplexity": result.perplexity["perplexity"], "perplexity_kjv": kjv["perplexity"],
               "kjv": pairable_perplexity(kjv), "tasks": tasks, "generative": generative_tasks(result),
               "n_items": {name: t["n"] for name, t in result.tasks.items()}}
    return summary, result


def save_cell(name: str, cell: dict, result: EvalResult) -> None:
    """Per-item results first, the cell last: the cell's file is what marks it finished."""
    result.save(OUT / "cells" / f"{name}.eval.json")
    write_json(OUT / "cells" / f"{name}.json", cell)


def finished(name: str) -> bool:
    return (OUT / "cells" / f"{name}.json").exists() and (OUT / "cells" / f"{name}.eval.json").exists()


def make_layer_plan(model, tokenizer, options: dict) -> CompressionPlan:
    options = dict(options)
    name = options.pop("scorer", "block_influence")
    scorer = SCORERS.get(name)
    scorer_options = {"batch_size": 4, **({"unit_kinds": ["layer"]} if name == "ablation" else {})}
    windows = token_windows(tokenizer, "handbook", 8, 128, split="calibration")
    profile = scorer(model, windows, scorer.make_config(scorer_options), progress=False,
                     calibration={"source": "handbook", "split": "calibration", "seed": 0}, model_spec="smollm2-135m")
    return make_plan(profile, "layer-skip", {**options, "protect_first": 1, "protect_last": 1}, model=model)


def plan_for(name: str, model, tokenizer) -> CompressionPlan:
    path = OUT / "plans" / f"{name}.json"
    if path.exists():
        plan = CompressionPlan.load(path)
    elif isinstance(PLANS[name], dict) and "profile" in PLANS[name]:
        spec = PLANS[name]
        profile = ImportanceProfile.load(ROOT / spec["profile"])
        # measured before the fingerprint scheme changed, on this same bundled model
        profile.model["fingerprint"] = model_fingerprint(model)
        plan = make_plan(profile, spec["planner"], spec["options"], model=model)
        plan.save(path)
    elif isinstance(PLANS[name], dict):
        plan = make_layer_plan(model, tokenizer, PLANS[name])
        plan.save(path)
    else:
        plan = CompressionPlan.load(ROOT / PLANS[name])
        plan.save(path)
    # The committed plans carry the fingerprint the model had when they were made; the fingerprint
    # scheme has since changed, and this benchmark applies each plan to the same bundled model.
    plan.model["fingerprint"] = None
    return plan


def run_cell(name: str, teacher, tokenizer) -> tuple[dict, EvalResult]:
    plan_name, heal = CELLS[name]
    student = copy.deepcopy(teacher)
    apply_(student, plan_for(plan_name, teacher, tokenizer))
    record = None
    if heal is not None:
        started = time.perf_counter()
        record = heal_(student, teacher, plan_for(plan_name, teacher, tokenizer), HealConfig(**heal), tokenizer,
                       work_dir=OUT / "work" / name)
        print(f"{name}: healed in {time.perf_counter() - started:.0f} s", flush=True)
    summary, result = measure(student, tokenizer)
    cell = {"cell": name, "plan": plan_name, "heal": heal, **summary,
            "heal_record": record.to_dict() if record else None, "machine": machine(), "versions": versions()}
    return cell, result


def main(argv=None) -> None:
    args = parse_args(argv)
    (OUT / "cells").mkdir(parents=True, exist_ok=True)
    (OUT / "plans").mkdir(parents=True, exist_ok=True)
    if not args.render:
        torch.set_num_threads(args.threads)
        teacher, tokenizer = load_model("smollm2-135m")
        if not finished("original"):
            summary, result = measure(teacher, tokenizer)
            save_cell("original", {"cell": "original", "plan": None, "heal": None, **summary}, result)
        for name in CELLS:
            path = OUT / "cells" / f"{name}.json"
            if finished(name) or (args.cells and not name.startswith(tuple(args.cells))):
                continue
            print(f"cell {name}", flush=True)
            save_cell(name, *run_cell(name, teacher, tokenizer))
            shutil.rmtree(OUT / "work" / name, ignore_errors=True)  # resumable checkpoints, hundreds of MB
            print(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                              if k in ("perplexity", "perplexity_kjv", "tasks")}), flush=True)
    render(OUT, CELLS)


if __name__ == "__main__":
    main()
