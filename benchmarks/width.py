"""Width or depth? SmolLM2 compressed by removing layers, heads, MLP neurons or a measured mix.

At 10%, 20% and 30% of the decoder's parameters removed, four ways to remove them:
- depth:   drop whole layers (block influence, ShortGPT's score: the layer plan mi-opt ships);
- heads:   prune attention heads only (free mode); attention holds 17% of a layer, so only the
           10% budget is reachable;
- neurons: prune MLP neuron groups of 64, least estimated damage per parameter across layers
           (free mode: loaded by mi_opt.load_compressed; one size in every layer cost twice
           the calibration loss);
- joint:   one budget spent across layers, heads and neurons, the mix chosen by the damage each
           candidate mix measurably does on calibration text (joint-prune planner, free).
Layers are ranked by block influence (ShortGPT's score, the layer plan mi-opt ships), heads and
neuron groups by attribution, the cheap neuron scorer that ranked closest to exact ablation
(per-layer Spearman 0.87 at 1/50 of its cost; activation and Wanda 0.27-0.34:
reports/neuron_scorers.md).
Each plan is evaluated unhealed and healed with the same heal budget: 30 steps of distillation
from the original into every weight (a width plan damages every layer, so local repair would
visit 30 sites one by one; reports/recovery.md found all-weight distillation as good per minute). Every cell measures perplexity on the
handbook and on the KJV (a domain healing never reads), every item of the five shipped tasks,
and, in one final pass (`--speed`), decode and prefill of every plan and the original timed
A/B in one process, interleaved (a healed model has its unhealed twin's shapes, so its speed).

Each finished cell is written to reports/width/cells/<cell>.json (its full eval beside it), so a
killed run resumes where it stopped; the table and plot are rebuilt from whatever cells exist
(benchmarks/width_render.py).

    python benchmarks/width.py                 # every cell, 20% first
    python benchmarks/width.py --cells 20-     # the cells whose name starts with 20-
    python benchmarks/width.py --speed         # time every finished plan against the original
    python benchmarks/width.py --render        # only rebuild reports/width.md
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch

from mi_opt.arch import get_adapter
from mi_opt.artifacts import machine, model_fingerprint, versions, write_json
from mi_opt.data import token_windows
from mi_opt.evaluate import EvalConfig, evaluate
from mi_opt.evaluate.ab_speed import measure_ab
from mi_opt.evaluate.config import SpeedConfig
from mi_opt.evaluate.perplexity import perplexity
from mi_opt.heal import HealConfig, heal_
from mi_opt.models import load_model
from mi_opt.plan import CompressionPlan
from mi_opt.policy import make_plan
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.profile.scorers import SCORERS
from mi_opt.surgery import apply_

from width_render import render

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "reports" / "width"
TASKS = ("miopt_facts_mc", "miopt_arithmetic", "miopt_capitals", "miopt_name_lookup", "miopt_sequences")
BUDGETS = (20, 10, 30)  # percent of decoder parameters removed; the target's budget first
KINDS = ("depth", "heads", "neurons", "joint")
# The same heal for every plan.
HEAL = {"method": "distill", "train": "all", "lr": 1e-4, "steps": 30}
# Scorers, both cheap: block influence for layers; attribution for heads and neuron groups.
PROFILES = {"layers": ("block_influence", {"batch_size": 4}),
            "width": ("attribution", {"unit_kinds": ["head", "neurons"], "neuron_group": 64, "batch_size": 4})}


def cells() -> dict[str, tuple[int, str, dict | None]]:
    """cell name -> (budget %, plan kind, heal options or None), in the order they run."""
    out = {}
    for budget in BUDGETS:
        for heal in (None, HEAL):  # every plan unhealed first: a partial run still compares them all
            for kind in KINDS:
                if kind == "heads" and budget > 10:
                    continue  # unreachable: every head but one per layer is about 16% of the decoder
                out[f"{budget}-{kind}-{'healed' if heal else 'unhealed'}"] = (budget, kind, heal)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", nargs="*", default=[], help="run only cells whose name starts with one of these")
    p.add_argument("--render", action="store_true", help="only rebuild the report from finished cells")
    p.add_argument("--speed", action="store_true", help="time every planned model against the original, A/B")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def eval_config() -> EvalConfig:
    return EvalConfig(parts=("perplexity", "tasks"), text_source="handbook+kjv", ppl_samples=16, ppl_seq_len=256,
                      tasks=TASKS, task_limit=None)


def measure(model, tokenizer, name: str) -> dict:
    result = evaluate(model, tokenizer, eval_config(), progress=False)
    result.save(OUT / "cells" / f"{name}.eval.json")  # per-item results, for paired tests against the original
    kjv = perplexity(model, tokenizer, "kjv", 16, 256, 4, 0, False)
    return {"perplexity": result.perplexity["perplexity"], "perplexity_kjv": kjv["perplexity"],
            "tasks": {n: t["metrics"][t["primary"]] for n, t in result.tasks.items()},
            "n_items": {n: t["n"] for n, t in result.tasks.items()},
            "parameters": sum(p.numel() for p in model.parameters()),
            "decoder_params": sum(p.numel() for p in get_adapter(model).layers().parameters()),
            "eval_wall_s": result.wall_time_s}


def calibration(tokenizer, n: int = 8, seq_len: int = 128) -> torch.Tensor:
    return token_windows(tokenizer, "handbook", n, seq_len, split="calibration")


def profile_for(kind: str, model, tokenizer) -> ImportanceProfile:
    path = OUT / "profiles" / f"{kind}.json"
    if path.exists():
        return ImportanceProfile.load(path)
    name, options = PROFILES[kind]
    scorer = SCORERS.get(name)
    profile = scorer(model, calibration(tokenizer), scorer.make_config(options), progress=True,
                     calibration={"source": "handbook", "split": "calibration", "seed": 0}, model_spec="smollm2-135m")
    profile.save(path)
    return profile


def merged_profile(model, tokenizer) -> ImportanceProfile:
    """Layer, head and neuron scores in one profile for the joint planner (which measures each
    candidate mix itself, so the scores only need to rank units of one kind)."""
    parts = [profile_for(k, model, tokenizer) for k in PROFILES]
    merged = copy.deepcopy(parts[0])
    for part in parts[1:]:
        merged.scores.update(part.scores)
    merged.method = {"scorer": "+".join(p.method["scorer"] for p in parts),
                     "parts": {k: p.method for k, p in zip(PROFILES, parts)}}
    return merged


def plan_options(budget: int, kind: str) -> tuple[str, str, dict]:
    """(profile kind, planner, options) of one plan."""
    fraction = budget / 100
    if kind == "depth":
        return "layers", "layer-skip", {"n_drop": round(30 * fraction), "protect_first": 1, "protect_last": 1}
    # Width plans rank by attribution's KL estimate, always >= 0 (its first-order delta_loss is
    # signed: groups it calls "helpful" went first), in free mode: one MLP size in every layer
    # raised the calibration loss 3.10 nats against 1.37 (benchmarks/width_ranking.py).
    if kind == "heads":
        return "width", "joint-prune", {"fraction": fraction, "parts": ["heads"], "mode": "free", "metric": "kl"}
    if kind == "neurons":
        return "width", "width-prune", {"fraction": fraction, "mode": "free", "metric": "kl"}
    return "merged", "joint-prune", {"fraction": fraction, "mode": "free", "metric": "kl"}


def plan_for(budget: int, kind: str, model, tokenizer) -> CompressionPlan:
    path = OUT / "plans" / f"{budget}-{kind}.json"
    if path.exists():
        return CompressionPlan.load(path)
    profile_kind, planner, options = plan_options(budget, kind)
    profile = merged_profile(model, tokenizer) if profile_kind == "merged" else profile_for(profile_kind, model,
                                                                                            tokenizer)
    profile.model["fingerprint"] = model_fingerprint(model)
    windows = calibration(tokenizer, 8, 256) if planner == "joint-prune" else None
    plan = make_plan(profile, planner, options, model=model, windows=windows)
    plan.save(path)
    return plan


def speed_pass(teacher, tokenizer) -> None:
    """Decode and prefill of the original and every plan made so far, interleaved in one process
    (on an idle machine: the result says in words when it was not)."""
    models = {"original": teacher}
    for path in sorted((OUT / "plans").glob("*.json")):
        models[path.stem] = copy.deepcopy(teacher)
        apply_(models[path.stem], CompressionPlan.load(path))
    result = measure_ab(models, SpeedConfig(repetitions=9), progress=True)
    write_json(OUT / "speed.json", result)
    print(f"timed {len(models) - 1} plans against the original; reliable: {result['reliable']}", flush=True)


def same_plan_cell(name: str, plan: CompressionPlan) -> dict | None:
    """A finished cell of the same budget and heal whose plan removes exactly what `plan` does
    (the joint planner may choose a pure mix): its measurements are this cell's too."""
    budget, kind, heal = cells()[name]
    what = lambda p: (p.drop_layers, p.prune_heads, p.prune_neurons)  # noqa: E731
    for other, (b, k, h) in cells().items():
        path = OUT / "cells" / f"{other}.json"
        if other != name and b == budget and h == heal and path.exists() and \
                what(CompressionPlan.load(OUT / "plans" / f"{b}-{k}.json")) == what(plan):
            return {**json.loads(path.read_text()), "cell": name, "kind": kind, "same_plan_as": other}
    return None


def run_cell(name: str, teacher, tokenizer) -> dict:
    budget, kind, heal = cells()[name]
    plan = plan_for(budget, kind, teacher, tokenizer)
    reused = same_plan_cell(name, plan)
    if reused is not None:
        shutil.copy(OUT / "cells" / f"{reused['same_plan_as']}.eval.json", OUT / "cells" / f"{name}.eval.json")
        return reused
    student = copy.deepcopy(teacher)
    apply_(student, plan)
    record = None
    if heal is not None:
        started = time.perf_counter()
        record = heal_(student, teacher, plan, HealConfig(**heal), tokenizer, work_dir=OUT / "work" / name)
        print(f"{name}: healed in {time.perf_counter() - started:.0f} s", flush=True)
    return {"cell": name, "budget": budget, "kind": kind, "heal": heal, **measure(student, tokenizer, name),
            "predicted": plan.predicted, "plan_planner": plan.planner,
            "heal_record": record.to_dict() if record else None, "machine": machine(), "versions": versions()}


def main(argv=None) -> None:
    args = parse_args(argv)
    for sub in ("cells", "plans", "profiles"):
        (OUT / sub).mkdir(parents=True, exist_ok=True)
    if not args.render:
        torch.set_num_threads(args.threads)
        teacher, tokenizer = load_model("smollm2-135m")
        if args.speed:
            speed_pass(teacher, tokenizer)
            render(OUT, cells())
            return
        original = OUT / "cells" / "original.json"
        if not original.exists():
            write_json(original, {"cell": "original", "budget": 0, "kind": "original", "heal": None,
                                  **measure(teacher, tokenizer, "original")})
        for name in cells():
            path = OUT / "cells" / f"{name}.json"
            if path.exists() or (args.cells and not name.startswith(tuple(args.cells))):
                continue
            print(f"cell {name}", flush=True)
            write_json(path, run_cell(name, teacher, tokenizer))
            shutil.rmtree(OUT / "work" / name, ignore_errors=True)
            print(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                              if k in ("perplexity", "perplexity_kjv", "tasks")}), flush=True)
    render(OUT, cells())


if __name__ == "__main__":
    main()
