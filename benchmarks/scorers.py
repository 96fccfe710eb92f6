"""Which scorer picks the parts to remove best? Every scorer's plan, at equal budget, evaluated.

    python benchmarks/scorers.py                  # full run (hours on 2 CPU cores: see below; resumable)
    python benchmarks/scorers.py --part layers    # only the layer-dropping half
    python benchmarks/scorers.py --render         # rewrite reports/scorers.md and plots from scorers.json

On SmolLM2-135M, calibrated on Debian handbook prose (calibration windows), judged on other
text (evaluation windows of handbook + KJV) and on the five shipped tasks (facts multiple choice;
generative arithmetic, capitals, name lookup and sequences; every item). For each method: its
cost (wall time and work in full-forward equivalents of one calibration batch, and the ratio to
block influence), its rank correlation with exact ablation, and the evaluation of the model its
plan produces: drop 4, 6, 8 of 30 layers (or the same parameters as attention/MLP
sublayers), prune a quarter, a third, a half of the heads. Each plan is also compared, paired
on the same items and windows, with a reference plan at the same budget (block influence for
layers, exact ablation for heads), so the report tells real differences between scorers from
noise. Results are saved after every step: an interrupted run resumes where it stopped.

Cost: since every item of every task is evaluated (about 970), each of the ~85 distinct plans
takes one full evaluation, 2-7 minutes here (the recipe reports' evaluations of compressed
models and of the original), so a full run is several sessions' worth. Methods and
evaluations already in scorers.json are skipped; profiles and per-item results are kept under
--cache (outside the work tree, so a machine that is kept keeps them).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mi_opt.artifacts import machine, read_json, versions, write_json
from mi_opt.data import token_windows
from mi_opt.evaluate import EvalConfig, evaluate
from mi_opt.evaluate.paired import generative_tasks, result_changes
from mi_opt.evaluate.result import EvalResult
from mi_opt.evaluate.stats import mean_of_scores
from mi_opt.models import load_model
from mi_opt.policy import make_plan
from mi_opt.policy.cost import ModelCost
from mi_opt.profile.baselines import best_block
from mi_opt.profile.cost import measured_forward_equivalents
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.profile.scorers import run_scorer
from mi_opt.surgery.heads import prune_heads_
from mi_opt.surgery.layers import drop_layers_

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scorers_render import render  # noqa: E402
from sublayers import sublayer_search, without_sublayers  # noqa: E402

REPORTS = Path(__file__).resolve().parents[1] / "reports"
VERSION = 2  # 2: every evaluation carries intervals and its paired change from the original
LAYER_BUDGETS = (4, 6, 8)
HEAD_BUDGETS = (0.25, 1 / 3, 0.5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-source", default="handbook")
    p.add_argument("--eval-source", default="handbook+kjv")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="calibration window length")
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--task-limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--random-seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--part", choices=("all", "layers", "heads"), default="all")
    p.add_argument("--render", action="store_true", help="only rewrite the report from scorers.json")
    p.add_argument("--note", action="append", default=[], help="a remark on how this run was made, kept in the report")
    p.add_argument("--out", type=Path, default=REPORTS)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mi-opt" / "bench-scorers",
                   help="profiles and per-item evaluation results, for resuming")
    return p.parse_args(argv)


class Bench:
    """The benchmark's state: saved after every step, so a rerun resumes."""

    def __init__(self, args):
        self.args, self.path = args, args.out / "scorers.json"
        self.data = read_json(self.path, "mi-opt/benchmark-scorers", VERSION) if self.path.exists() else None
        if self.data is not None and self.data["version"] < VERSION and not args.render:
            # Version 1 kept no per-item results, so its evaluations can't be paired with the
            # original's, and its costs were measured with an older engine: nothing carries over.
            print(f"{self.path} is version {self.data['version']} (no per-item results): starting afresh", flush=True)
            self.data = None
        self.data = self.data or {
            "schema": "mi-opt/benchmark-scorers", "version": VERSION, "model": args.model,
            "calibration": {"source": args.calib_source, "split": "calibration", "n_samples": args.calib_samples,
                            "seq_len": args.seq_len},
            "evaluation": {"text": args.eval_source, "split": "evaluation", "n_samples": args.eval_samples,
                           "seq_len": args.eval_seq_len, "task_limit": args.task_limit},
            "machine": machine(), "versions": versions(), "threads": args.threads,
            "profiles": {}, "methods": {}, "evals": {}, "correlations": {}}
        args.cache.mkdir(parents=True, exist_ok=True)

    def save(self):
        write_json(self.path, self.data)

    def profile(self, name: str, make) -> ImportanceProfile:
        path = self.args.cache / f"{name}.json"
        if path.exists():
            prof = ImportanceProfile.load(path)  # its measured cost travels with it
        else:
            started = time.perf_counter()
            prof = make()
            prof.cost["measured_wall_s"] = round(time.perf_counter() - started, 2)
            prof.save(path)
        if name in self.data["profiles"]:
            return prof
        self.data["profiles"][name] = {"wall_s": prof.cost["measured_wall_s"],
                                       "forward_equivalents": round(measured_forward_equivalents(prof.cost), 2)}
        self.save()
        print(f"profile {name}: {self.data['profiles'][name]}", flush=True)
        return prof

    def cost_of(self, name: str) -> dict:
        return dict(self.data["profiles"][name])

    def method(self, name: str, kind: str, description: str, budgets: dict) -> None:
        """budgets: budget label -> {"plan": {...}, "cost": {"wall_s", "forward_equivalents"}}."""
        self.data["methods"][name] = {"kind": kind, "description": description, "budgets": budgets}
        self.save()


def _eval_key(kind: str, plan: dict) -> str:
    return f"{kind}:{sorted(plan.items())}"


def _eval_path(bench: Bench, key: str) -> Path:
    """Where one evaluation's per-item results are kept (the cache: for resuming and pairing)."""
    name = "original" if key == "original" else hashlib.sha256(key.encode()).hexdigest()[:16]
    return bench.args.cache / "evals" / f"{name}.eval.json"


def evaluate_original(bench: Bench, model, tok, config: EvalConfig) -> EvalResult:
    """The original's per-item results, which every plan's change is paired against."""
    path = _eval_path(bench, "original")
    if path.exists() and "original" in bench.data["evals"]:
        return EvalResult.load(path)
    result = evaluate(model, tok, config, progress=False)
    result.save(path)
    bench.data["evals"]["original"] = summarize(result, model)
    bench.save()
    return result


def evaluate_plans(bench: Bench, model, tok, config: EvalConfig, original: EvalResult) -> None:
    """Evaluate every distinct plan not evaluated yet (plans shared by methods run once)."""
    todo = {}
    for m in bench.data["methods"].values():
        for b in m["budgets"].values():
            todo.setdefault(_eval_key(m["kind"], b["plan"]), (m["kind"], b["plan"]))
    for key, (kind, plan) in tqdm(todo.items(), desc="evaluating plans", unit="plan"):
        if key in bench.data["evals"]:
            continue
        started = time.perf_counter()
        work = copy.deepcopy(model)
        if kind == "layers":
            drop_layers_(work, plan["drop"])
        elif kind == "heads":
            prune_heads_(work, {int(k): v for k, v in plan["prune"].items()}, mode="free")
        elif kind == "sublayers":
            without_sublayers(work, plan["remove"])
        result = evaluate(work, tok, config, progress=False)
        result.save(_eval_path(bench, key))
        bench.data["evals"][key] = summarize(result, work, original)
        del work
        tqdm.write(f"eval {key[:90]}: perplexity {bench.data['evals'][key]['perplexity']:.2f} "
                   f"({time.perf_counter() - started:.0f} s)")
        bench.save()


def summarize(result: EvalResult, model, original: EvalResult | None = None) -> dict:
    """Scores with their 95% intervals and, against the original, each change paired on the same
    items (McNemar) or windows (bootstrap), so the report marks only what a paired test finds."""
    tasks = {name: r["metrics"][r["primary"]] for name, r in result.tasks.items()}
    generative = generative_tasks(result)
    out = {"perplexity": round(result.perplexity["perplexity"], 4),
           "perplexity_interval": [round(v, 4) for v in result.perplexity["interval"]],
           "tasks": tasks, "task_intervals": {name: r["score"]["interval"] for name, r in result.tasks.items()},
           "n_items": {name: r["n"] for name, r in result.tasks.items()},
           "generative_mean": round(sum(tasks[t] for t in generative) / len(generative), 4),
           "generative_interval": mean_of_scores([result.tasks[t]["score"] for t in generative])["interval"],
           "parameters": sum(p.numel() for p in model.parameters())}
    if original is not None:
        out["changes"] = result_changes(original, result)
    return out


# Each kind's plans are also compared with one reference method's plan at the same budget: the
# cheap baseline for layers, the best one-shot scorer for heads.
REFERENCES = {"layers": "block influence (ShortGPT)", "heads": "heads/ablation (KL)"}


def versus_reference(bench: Bench) -> None:
    """Every plan's change from its kind's reference plan at the same budget, paired on the same
    items and windows: which differences between scorers are real, not only which differ from the
    original. Reads the cached per-item results; plans whose results are not cached are skipped."""
    loaded: dict[str, EvalResult | None] = {}

    def result_of(kind: str, plan: dict) -> EvalResult | None:
        key = _eval_key(kind, plan)
        if key not in loaded:
            path = _eval_path(bench, key)
            loaded[key] = EvalResult.load(path) if path.exists() else None
        return loaded[key]

    versus = bench.data.setdefault("versus", {})
    for name, m in bench.data["methods"].items():
        ref_name = REFERENCES["heads" if m["kind"] == "heads" else "layers"]
        ref = bench.data["methods"].get(ref_name)
        if ref is None or name == ref_name:
            continue
        for budget, b in m["budgets"].items():
            if budget in versus.get(name, {}) or budget not in ref["budgets"]:
                continue
            ref_plan = ref["budgets"][budget]["plan"]
            if _eval_key(ref["kind"], ref_plan) == _eval_key(m["kind"], b["plan"]):
                versus.setdefault(name, {})[budget] = {"reference": ref_name, "same_plan": True}
                continue
            base, other = result_of(ref["kind"], ref_plan), result_of(m["kind"], b["plan"])
            if base is not None and other is not None:
                versus.setdefault(name, {})[budget] = {"reference": ref_name, **result_changes(base, other)}
    bench.save()


def layer_methods(bench: Bench, model, windows, copy_windows) -> None:
    bs = {"batch_size": 4}
    have = bench.data["methods"]

    def one_shot(name, prof_name, desc, metric="kl", extra=None, data=windows):
        if name in have:
            return
        prof = bench.profile(prof_name, lambda: run_scorer(prof_name.split("[")[0], model, data,
                                                            {"unit_kinds": ("layer",), **(extra or {})}))
        budgets = {str(k): {"plan": {"drop": make_plan(prof, "layer-skip", {"n_drop": k, "metric": metric},
                                                      model, progress=False).drop_layers},
                            "cost": bench.cost_of(prof_name)} for k in LAYER_BUDGETS}
        bench.method(name, "layers", desc, budgets)

    def searched(name, prof_name, desc, options, data=windows):
        if name in have:
            return
        prof = bench.profile(prof_name, lambda: run_scorer(prof_name.split("[")[0], model, data,
                                                            {"unit_kinds": ("layer",), **bs}))
        plan = make_plan(prof, "layer-skip", {"n_drop": max(LAYER_BUDGETS), **options}, model, windows=data)
        rounds = plan.planner["rounds"]
        base = bench.cost_of(prof_name) if options.get("beam_width", 1) == 1 else {"wall_s": 0, "forward_equivalents": 0}
        budgets = {}
        for k in LAYER_BUDGETS:
            drop = rounds[k - 1]["best"] if "best" in rounds[k - 1] else [i for r in rounds[:k] for i in r["dropped"]]
            budgets[str(k)] = {"plan": {"drop": sorted(drop)}, "cost": {
                "wall_s": round(base["wall_s"] + rounds[k - 1]["wall_s"], 2),
                "forward_equivalents": round(base["forward_equivalents"] + rounds[k - 1]["forward_equivalents"], 2)}}
        bench.method(name, "layers", desc, budgets)

    for seed in range(bench.args.random_seeds):
        one_shot(f"random (seed {seed})", f"random[seed{seed}]", "seeded random scores", extra={"seed": seed}, metric="delta_loss")
    # Non-causal scores live under delta_loss only (profile schema v2: their kl is None).
    one_shot("weight magnitude", "weight_magnitude[layer]", "L2 norm of the layer's weights", metric="delta_loss")
    one_shot("block influence (ShortGPT)", "block_influence[layer]", "1 - cos(layer input, output), one-shot",
             metric="delta_loss")
    if "angular distance (Gromov)" not in have:
        budgets = {}
        for k in LAYER_BUDGETS:
            started = time.perf_counter()
            start, _ = best_block(model, windows, k, batch_size=4, progress=False)
            budgets[str(k)] = {"plan": {"drop": list(range(start, start + k))},
                               "cost": {"wall_s": round(time.perf_counter() - started, 2),
                                        "forward_equivalents": float(-(-len(windows) // 4))}}
        bench.method("angular distance (Gromov)", "layers", "best contiguous block by last-token angular "
                     "distance", budgets)
    one_shot("attribution (KL)", "attribution[layer]", "attribution patching, second-order KL estimate, one-shot")
    one_shot("attribution (delta loss)", "attribution[layer]", "attribution patching, first order, one-shot",
             metric="delta_loss")
    one_shot("ablation (KL)", "ablation[layer]", "exact zero ablation, KL, one-shot")
    one_shot("ablation (delta loss)", "ablation[layer]", "exact zero ablation, calibration loss, one-shot",
             metric="delta_loss")
    searched("block influence, iterative", "block_influence[layer]", "block influence re-scored after each drop",
             {"iterative": True, "rescore": "block_influence"})
    searched("ablation (KL), iterative", "ablation[layer]", "exact ablation re-scored after each drop",
             {"iterative": True, "metric": "kl"})
    searched("BI + exact boundary, iterative", "block_influence[layer]",
             "block influence ranks; each round exact ablation (KL) of the 4 lowest-ranked only",
             {"iterative": True, "rescore": "ablation", "metric": "kl", "candidates": 4})
    searched("beam search (width 3)", "ablation[layer]", "beam over drop sets by calibration loss, "
             "8 lowest-ranked candidates per state", {"beam_width": 3, "candidates": 8})
    if "sublayers (KL/param), iterative" not in have:
        bench.method("sublayers (KL/param), iterative", "sublayers",
                     "attention and MLP sublayers removed separately, least KL per parameter first, "
                     "6 lowest re-scored exactly per round; same parameters as k whole layers",
                     sublayer_search(model, windows, [k * _layer_params(model) for k in LAYER_BUDGETS],
                                     [str(k) for k in LAYER_BUDGETS], candidates=6))
    # The same, scored on prose + repeated prose (in-context copying, which few-shot prompts use).
    one_shot("block influence, prose + repeated prose", "block_influence[layer,repeat]",
             "block influence on prose + repeated-prose windows", data=copy_windows, metric="delta_loss")
    one_shot("ablation (KL), prose + repeated prose", "ablation[layer,repeat]",
             "exact ablation, KL, on prose + repeated-prose windows", data=copy_windows)
    searched("ablation (KL), iterative, prose + repeated prose", "ablation[layer,repeat]",
             "exact ablation, KL, re-scored after each drop, on prose + repeated-prose windows",
             {"iterative": True, "metric": "kl"}, data=copy_windows)
    searched("BI + exact boundary, iterative, prose + repeated prose", "block_influence[layer,repeat]",
             "block influence ranks, exact ablation (KL) of the 4 lowest-ranked per round, on prose + "
             "repeated-prose windows", {"iterative": True, "rescore": "ablation", "metric": "kl", "candidates": 4},
             data=copy_windows)


def _layer_params(model) -> int:
    return ModelCost.from_model(model).layer_params[0]


def head_methods(bench: Bench, model, windows, copy_windows) -> None:
    have = bench.data["methods"]

    def one_shot(name, prof_name, desc, metric="kl", extra=None, data=windows):
        name = f"heads/{name}"  # the same scorer names as the layer methods, kept apart
        if name in have:
            return
        prof = bench.profile(prof_name, lambda: run_scorer(prof_name.split("[")[0], model, data,
                                                            {"unit_kinds": ("head",), **(extra or {})}))
        budgets = {f"{f:.2f}": {"plan": {"prune": {str(k): v for k, v in make_plan(
            prof, "head-prune", {"fraction": f, "mode": "free", "metric": metric}, model,
            progress=False).prune_heads.items()}}, "cost": bench.cost_of(prof_name)} for f in HEAD_BUDGETS}
        bench.method(name, "heads", desc, budgets)

    def in_rounds(name, prof_name, desc, rounds, data):
        name = f"heads/{name}"
        if name in have:
            return
        prof = bench.profile(prof_name, None)  # made by a one-shot method above
        budgets = {}
        for f in HEAD_BUDGETS:
            plan = make_plan(prof, "head-prune", {"fraction": f, "mode": "free", "metric": "kl", "rounds": rounds},
                             model, windows=data, progress=False)
            extra = [r["cost"] for r in plan.planner["rounds"] if "cost" in r]
            cost = bench.cost_of(prof_name)
            budgets[f"{f:.2f}"] = {"plan": {"prune": {str(k): v for k, v in plan.prune_heads.items()}}, "cost": {
                "wall_s": round(cost["wall_s"] + sum(c["wall_time_s"] for c in extra), 2),
                "forward_equivalents": round(cost["forward_equivalents"]
                                             + sum(measured_forward_equivalents(c) for c in extra), 2)}}
        bench.method(name, "heads", desc, budgets)

    for seed in range(bench.args.random_seeds):
        one_shot(f"random (seed {seed})", f"random[head,seed{seed}]", "seeded random scores", extra={"seed": seed}, metric="delta_loss")
    one_shot("weight magnitude", "weight_magnitude[head]", "L2 norm of the head's q rows and o columns", metric="delta_loss")
    one_shot("attribution (KL)", "attribution[head]", "attribution patching, second-order KL estimate")
    one_shot("attribution (delta loss)", "attribution[head]", "attribution patching, first order",
             metric="delta_loss")
    one_shot("ablation (KL)", "ablation[head]", "exact zero ablation, KL")
    one_shot("ablation (delta loss)", "ablation[head]", "exact zero ablation, calibration loss", metric="delta_loss")
    in_rounds("attribution (KL), 3 rounds", "attribution[head]", "attribution patching, KL, pruning in 3 steps "
              "with the remaining heads re-scored after each", 3, data=windows)
    in_rounds("ablation (KL), 2 rounds", "ablation[head]", "exact ablation, KL, pruning in 2 steps with the "
              "remaining heads re-scored after the first", 2, data=windows)
    one_shot("ablation (KL), prose + repeated prose", "ablation[head,repeat]",
             "exact zero ablation, KL, on calibration windows of which every other one repeats its first half "
             "(in-context copying, what few-shot prompts use)", data=copy_windows)
    one_shot("attribution (KL), prose + repeated prose", "attribution[head,repeat]",
             "attribution patching, KL, on the same prose + repeated-prose windows", data=copy_windows)


def correlations(bench: Bench) -> None:
    """Spearman and Kendall of every cached profile against exact ablation on the same windows."""
    from scipy.stats import kendalltau, spearmanr

    for path in sorted(bench.args.cache.glob("*.json")):
        prof = ImportanceProfile.load(path)
        kind = "head" if prof.units("head") else "layer"
        reference = bench.args.cache / f"ablation[{kind}{',repeat' if 'repeat' in path.stem else ''}].json"
        if path == reference or not reference.exists():
            continue
        ref = ImportanceProfile.load(reference)
        keys = ref.units(kind)
        if not all(k in prof.scores for k in keys):
            continue
        for metric in ("kl", "delta_loss"):
            if not prof.has_metric(metric):  # non-causal scorers measure no KL (profile schema v2)
                continue
            a, b = [prof.score(k, metric) for k in keys], [ref.score(k, metric) for k in keys]
            bench.data["correlations"][f"{path.stem}/{kind}/{metric}"] = {
                "n": len(keys), "spearman": round(float(spearmanr(a, b)[0]), 4),
                "kendall": round(float(kendalltau(a, b)[0]), 4)}
    bench.save()


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    if args.note:
        bench.data.setdefault("notes", []).extend(args.note)
        bench.save()
    if not args.render:
        torch.set_num_threads(args.threads)
        model, tok = load_model(args.model)
        windows = token_windows(tok, args.calib_source, args.calib_samples, args.seq_len, split="calibration")
        config = EvalConfig(parts=("perplexity", "tasks"), text_source=args.eval_source,
                            ppl_samples=args.eval_samples, ppl_seq_len=args.eval_seq_len, task_limit=args.task_limit,
                            threads=args.threads)
        original = evaluate_original(bench, model, tok, config)
        copy_windows = token_windows(tok, f"{args.calib_source}+repeat:{args.calib_source}", args.calib_samples,
                                     args.seq_len, split="calibration")
        if args.part in ("all", "layers"):
            layer_methods(bench, model, windows, copy_windows)
            evaluate_plans(bench, model, tok, config, original)
        if args.part in ("all", "heads"):
            head_methods(bench, model, windows, copy_windows)
            evaluate_plans(bench, model, tok, config, original)
        correlations(bench)
    if (args.cache / "evals").is_dir():
        versus_reference(bench)
    render(bench.data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
