"""Bit-width allocation on SmolLM2 at equal bytes: measured quantization damage vs the alternatives.

Every mixed allocation below stores the decoder linears in the same bytes as "half the layers
int8, half nf4". Compared: the sensitivity-driven knapsack per layer and per module (widths
{4, 8}, and {4, 8, 16} under the same byte budget), random layer halves (several seeds), random
module sets filled to the same bytes, positional halves (first half 8-bit and the reverse),
halves by layer-ablation importance (the `score="importance"` baseline), and uniform nf4 / int8
(other sizes, for reference). Sensitivity is measured on calibration windows of one text;
perplexity is judged on the evaluation split of another, and every allocation is evaluated on
every item of the shipped tasks. Each row's change from the unquantized model, and from each
random layer half, is paired on the same windows (bootstrap) and items (McNemar), so the report
marks only differences a paired test finds.

Target (issue 7): perplexity increase at most 0.3x a random allocation's.

    python benchmarks/bits.py                       # full run, writes reports/bits.md and bits.json
    python benchmarks/bits.py --quick               # smaller everything, a smoke run

Resumable: each allocation's per-item results are kept under --cache (keyed by its bits and
every evaluation setting) and the sensitivities in --out, so an interrupted run picks up where
it stopped. Speed is not measured here: bitsandbytes on CPU is not how these models deploy
(see benchmarks/deploy.py for A/B timings of deployable files).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from tqdm.auto import tqdm

from mi_opt.arch import get_adapter
from mi_opt.artifacts import machine, model_fingerprint, versions, write_json
from mi_opt.data import token_windows
from mi_opt.evaluate.config import DEFAULT_TASKS
from mi_opt.evaluate.paired import generative_tasks, result_changes
from mi_opt.evaluate.result import EvalResult
from mi_opt.evaluate.stats import mean_of_scores
from mi_opt.models import load_model
from mi_opt.plan import INT8_THRESHOLD
from mi_opt.policy import make_plan
from mi_opt.policy.bits import BitsConfig, allocate_bits, allocation_size
from mi_opt.profile.quant_sensitivity import (GRANULARITIES, QuantSensitivity, measure_quant_sensitivity, quant_units,
                                             unit_sizes)
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.surgery.quantize import quantize_

from bits_render import render_markdown

REPORTS = Path(__file__).resolve().parent.parent / "reports"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-source", default="handbook")
    p.add_argument("--eval-source", default="kjv")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
    p.add_argument("--int8-threshold", type=float, default=INT8_THRESHOLD,
                   help="LLM.int8 outlier threshold of every int8 module (0 = pure vector-wise int8)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="tasks of mi_opt.evaluate ('' to skip)")
    p.add_argument("--task-limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--granularities", default="layer,module", help="sensitivity granularities to allocate at")
    p.add_argument("--sensitivity", type=Path, action="append", default=[],
                   help="reuse a saved mi-opt/quant-sensitivity JSON (repeatable, one per granularity) instead of "
                        "measuring; its own calibration is the one recorded")
    p.add_argument("--no-importance", action="store_true",
                   help="skip the layer-ablation profile and its allocation (saves one profiling pass)")
    p.add_argument("--render", type=Path, default=None, help="only rewrite bits.md from an existing bits.json")
    p.add_argument("--quick", action="store_true", help="4 calibration / 4 evaluation windows of 128, 1 seed, no tasks")
    p.add_argument("--out", type=Path, default=REPORTS)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mi-opt" / "bench-bits",
                   help="per-item evaluation results of each allocation, for resuming and pairing")
    args = p.parse_args(argv)
    args.granularities = tuple(g for g in args.granularities.split(",") if g)
    if not args.granularities or any(g not in GRANULARITIES for g in args.granularities):
        p.error(f"--granularities must name some of {GRANULARITIES}")
    if args.quick:
        args.calib_samples, args.eval_samples, args.seq_len, args.random_seeds, args.tasks = 4, 4, 128, 1, ""
    return args


def evaluate_allocation(base, tok, bits: dict, args, eval_config) -> EvalResult:
    """The quantized model's evaluation, from the cache when this allocation was evaluated before
    with the same settings (the key holds the bits, the quantizer and every evaluation setting)."""
    from dataclasses import asdict

    from mi_opt.evaluate import evaluate

    key = json.dumps({"bits": bits, "quant_type": args.quant_type, "int8_threshold": args.int8_threshold,
                      "model": args.model, "eval": asdict(eval_config)}, sort_keys=True, default=str)
    path = args.cache / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.eval.json"
    if path.exists():
        return EvalResult.load(path)
    model = copy.deepcopy(base)
    if bits:
        quantize_(model, bits, args.quant_type, args.int8_threshold)
    result = evaluate(model, tok, eval_config, progress=False)
    del model
    args.cache.mkdir(parents=True, exist_ok=True)
    result.save(path)
    return result


def summarize(result: EvalResult) -> dict:
    """Perplexity and task scores with their 95% intervals."""
    out = {"perplexity": result.perplexity["perplexity"], "perplexity_interval": result.perplexity.get("interval"),
           "nll_mean": result.perplexity["nll_mean"]}
    if result.tasks:
        out["tasks"] = {name: {"metric": r["primary"], "score": r["metrics"][r["primary"]], "n": r["n"],
                               "interval": r["score"]["interval"]} for name, r in result.tasks.items()}
        generative = generative_tasks(result)
        if generative:
            mean = mean_of_scores([result.tasks[t]["score"] for t in generative])
            out["generative_mean"], out["generative_interval"] = mean["mean"], mean["interval"]
    return out


def _verdict(change: dict | None) -> dict | None:
    """The parts of a paired change a report needs."""
    if not change or "change" not in change:
        return None
    return {k: change[k] for k in ("change", "interval", "p_value", "significant", "test") if k in change}


def paired_rows(rows: dict, results: dict[str, EvalResult]) -> None:
    """Each row's changes from the unquantized model and from each random layer half, paired."""
    reference = results["fp32 (reference)"]
    randoms = [k for k in results if k.startswith("random layers")]
    for name, row in rows.items():
        if name == "fp32 (reference)":
            continue
        row["changes"] = {m: _verdict(c) for m, c in result_changes(reference, results[name]).items()}
        row["vs_random_layers"] = {
            other: {m: _verdict(c) for m, c in result_changes(results[other], results[name]).items()
                    if m in ("perplexity", "generative_mean")}
            for other in randoms if other != name}


def random_fill(sizes: dict, budget: int, seed: int) -> dict:
    """Units in a random order, each raised from 4 to 8 bits while the bytes still fit the budget."""
    keys = sorted(sizes)
    random.Random(seed).shuffle(keys)
    bits = {k: 4 for k in keys}
    used = allocation_size(sizes, bits)[1]
    for k in keys:
        extra = sizes[k]["bytes"]["8"] - sizes[k]["bytes"]["4"]
        if used + extra <= budget:
            bits[k], used = 8, used + extra
    return bits


def sensitivity_for(granularity: str, base, calib, args) -> QuantSensitivity:
    """A saved sensitivity of this granularity from --sensitivity; else the one an earlier run of
    this benchmark measured the same way (resuming); else measured now and saved."""
    for path in args.sensitivity:
        sens = QuantSensitivity.load(path)
        if sens.method.get("granularity") != granularity:
            continue
        if sens.model.get("fingerprint") != model_fingerprint(base):
            raise SystemExit(f"{path} was measured on another model")
        if sens.int8_threshold != args.int8_threshold:
            raise SystemExit(f"{path} measured int8 at outlier threshold {sens.int8_threshold}, "
                             f"not --int8-threshold {args.int8_threshold}")
        return sens
    saved = args.out / f"bits-sensitivity-{granularity}.json"
    if saved.exists():
        sens = QuantSensitivity.load(saved)
        cal = sens.calibration
        if (sens.model.get("fingerprint") == model_fingerprint(base) and sens.int8_threshold == args.int8_threshold
                and sens.method.get("quant_type") == args.quant_type and cal.get("source") == args.calib_source
                and cal.get("n_samples") == len(calib) and cal.get("seq_len") == calib.shape[1]):
            print(f"reusing {saved} (measured the same way)", flush=True)
            return sens
    sens = measure_quant_sensitivity(base, calib, widths=(4, 8), granularity=granularity, quant_type=args.quant_type,
                                     calibration={"source": args.calib_source, "split": "calibration"},
                                     model_spec=args.model, int8_threshold=args.int8_threshold)
    sens.save(saved)
    return sens


def build_allocations(base, calib, args, timings: dict) -> tuple[dict, dict, int]:
    """name -> (bits, sizes), the sensitivities by granularity, and the equal-bytes budget."""
    n = len(base.model.layers)
    sensitivities = {}
    for granularity in args.granularities:
        t = time.perf_counter()
        sensitivities[granularity] = sensitivity_for(granularity, base, calib, args)
        timings[f"sensitivity_{granularity}_s"] = round(time.perf_counter() - t, 1)
    layer_sizes = unit_sizes(base, quant_units(get_adapter(base), "layer"))
    half = {f"L{i}": 8 if i < n // 2 else 4 for i in range(n)}
    budget = allocation_size(layer_sizes, half)[1]   # equal bytes for every mixed allocation
    allocations: dict[str, tuple[dict, dict]] = {"fp32 (reference)": ({}, layer_sizes)}
    for granularity, sens in sensitivities.items():
        damage = {k: {int(w): v["kl"] for w, v in per.items()} for k, per in sens.scores.items()}
        for widths in ((4, 8), (4, 8, 16)):
            # the planner's own allocation step (make_plan(..., "bits", ...) runs the same function)
            bits, _ = allocate_bits(damage, sens.sizes, BitsConfig(max_bytes=budget, widths=widths))
            name = f"sensitivity per {granularity} {{" + ", ".join(map(str, widths)) + "}"
            allocations[name] = (bits, sens.sizes)
    if not args.no_importance:
        t = time.perf_counter()
        profile = profile_ablation(base, calib, AblationConfig(unit_kinds=("layer",)),
                                   calibration={"source": args.calib_source}, model_spec=args.model)
        timings["layer_profile_s"] = round(time.perf_counter() - t, 1)
        plan = make_plan(profile, "bits", {"max_bytes": budget, "widths": (4, 8), "score": "importance",
                                           "int8_threshold": args.int8_threshold}, base, progress=False)
        allocations["layer importance {4, 8}"] = ({k: b for k, b in plan.bits.items() if k.startswith("L")},
                                                  layer_sizes)
    allocations["first half 8-bit"] = (half, layer_sizes)
    allocations["second half 8-bit"] = ({f"L{i}": 4 if i < n // 2 else 8 for i in range(n)}, layer_sizes)
    for seed in range(args.random_seeds):
        chosen = set(random.Random(seed).sample(range(n), n // 2))
        allocations[f"random layers (seed {seed})"] = ({f"L{i}": 8 if i in chosen else 4 for i in range(n)},
                                                       layer_sizes)
    if "module" in sensitivities:
        module_sizes = sensitivities["module"].sizes
        for seed in range(args.random_seeds):
            allocations[f"random modules (seed {seed})"] = (random_fill(module_sizes, budget, seed), module_sizes)
    allocations["uniform nf4" if args.quant_type == "nf4" else "uniform fp4"] = (
        {f"L{i}": 4 for i in range(n)}, layer_sizes)
    allocations["uniform int8"] = ({f"L{i}": 8 for i in range(n)}, layer_sizes)
    return allocations, sensitivities, budget


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        payload = json.loads(args.render.read_text())
        (args.render.parent / "bits.md").write_text(render_markdown(payload))
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base, tok = load_model(args.model)
    calib = token_windows(tok, args.calib_source, args.calib_samples, args.seq_len, split="calibration")
    args.out.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    allocations, sensitivities, budget = build_allocations(base, calib, args, timings)

    from mi_opt.evaluate.config import EvalConfig

    tasks = tuple(t for t in args.tasks.split(",") if t)
    eval_config = EvalConfig(parts=("perplexity",) + (("tasks",) if tasks else ()),
                             text_source=args.eval_source, ppl_samples=args.eval_samples, ppl_seq_len=args.seq_len,
                             tasks=tasks or DEFAULT_TASKS, task_limit=args.task_limit, threads=args.threads)
    rows, results = {}, {}
    for name, (bits, sizes) in tqdm(allocations.items(), desc="evaluating allocations", unit="allocation"):
        t = time.perf_counter()
        avg_bits, size = allocation_size(sizes, bits)
        results[name] = evaluate_allocation(base, tok, bits, args, eval_config)
        rows[name] = {"bits": bits, "linear_bytes": size, "avg_bits": avg_bits, **summarize(results[name]),
                      "eval_s": round(time.perf_counter() - t, 1)}  # ~0 when resumed from the cache
        tqdm.write(f"{name}: ppl {rows[name]['perplexity']:.3f}, {rows[name]['linear_bytes'] / 1e6:.2f} MB")
        write_json(args.out / "bits.partial.json", {"rows": rows})  # a crash later keeps what was measured

    paired_rows(rows, results)
    ref = rows["fp32 (reference)"]["perplexity"]
    randoms = [r["perplexity"] - ref for k, r in rows.items() if k.startswith("random layers")]
    random_increase = statistics.mean(randoms)
    for r in rows.values():
        r["ppl_increase"] = r["perplexity"] - ref
        r["increase_vs_random"] = r["ppl_increase"] / random_increase if random_increase > 0 else None
    ratios = {k: r["increase_vs_random"] for k, r in rows.items() if k.startswith("sensitivity")}
    payload = {"schema": "mi-opt/benchmark-bits", "version": 3, "command": "python benchmarks/bits.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "args": {k: str(v) for k, v in vars(args).items()},
        "tasks": list(tasks), "equal_bytes_budget": budget,
        "linear_bytes_16bit": allocation_size(allocations["fp32 (reference)"][1], {})[1],
        "target": "sensitivity ppl increase <= 0.3x the mean of the random layer halves'",
        "sensitivity_vs_random": ratios, "target_met": any(v is not None and v <= 0.3 for v in ratios.values()),
        "sensitivity": {g: {"scores": s.scores, "sizes": s.sizes, "calibration": s.calibration, "cost": s.cost,
                            "method": s.method, "base_loss": s.base_loss} for g, s in sensitivities.items()},
        "rows": rows, "timings": {**timings, "total_s": round(time.perf_counter() - started, 1)},
        "machine": machine(), "versions": versions()}
    write_json(args.out / "bits.json", payload)
    (args.out / "bits.partial.json").unlink(missing_ok=True)
    (args.out / "bits.md").write_text(render_markdown(payload))
    print(json.dumps({"sensitivity_vs_random": ratios, "total_s": payload["timings"]["total_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
