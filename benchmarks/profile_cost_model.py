"""Check the profile cost model (mi_opt/profile/cost.py) against measured runs on SmolLM2-135M.

Calibrates this machine's effective FLOP/s with timed clean forwards, then predicts each
profile's forward-pass equivalents (must match exactly) and wall time (an estimate), runs it
and records both in reports/profile_cost_model.json after every run. On a shared CPU the
wall times are noisy (the load average is recorded with each run).

    python benchmarks/profile_cost_model.py [--n-samples 4 --seq-len 128 --runs fast-lam,naive-layer]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from mi_opt.arch import get_adapter
from mi_opt.artifacts import machine, now, versions, write_json
from mi_opt.data import token_windows
from mi_opt.models import load_model
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.profile.cost import ModelShape, estimate
from mi_opt.units import enumerate_units

RUNS = {
    "fast-lam": AblationConfig(unit_kinds=("layer", "attn", "mlp")),
    "fast-layer": AblationConfig(unit_kinds=("layer",)),
    "fast-layer-budget": AblationConfig(unit_kinds=("layer",), cache_budget_mb=1.0),
    "naive-layer": AblationConfig(unit_kinds=("layer",), engine="naive"),
}


def clean_forward_s(model, ids: torch.Tensor, reps: int = 3) -> float:
    with torch.inference_mode():
        model(ids, use_cache=False)                       # burn-in
        started = time.perf_counter()
        for _ in range(reps):
            model(ids, use_cache=False)
    return (time.perf_counter() - started) / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--runs", default="fast-lam,fast-layer-budget,naive-layer", help=f"comma list of {list(RUNS)}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="reports/profile_cost_model.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    adapter = get_adapter(model)
    windows = token_windows(tok, "handbook", args.n_samples, args.seq_len, split="calibration")
    shape = ModelShape.of(model)
    t_forward = clean_forward_s(model, windows[:4])
    one_forward = estimate(shape, [], min(4, args.n_samples), args.seq_len, batch_size=4)
    flops_per_s = one_forward.flops / t_forward
    runs = []
    for name in args.runs.split(","):
        config = RUNS[name]
        profile = profile_ablation(model, windows, config, calibration={"source": "handbook"})
        layers = [u.layer for u in enumerate_units(adapter, config.unit_kinds, config.neuron_group)]
        est = estimate(shape, layers, args.n_samples, args.seq_len, batch_size=config.batch_size,
                       engine=config.engine, cache_stride=profile.cost.get("cache_stride", 1))
        runs.append({"run": name, "n_units": len(layers), "cache_stride": profile.cost.get("cache_stride", 1),
                     "predicted_forward_equivalents": est.full_forward_equivalents,
                     "measured_forward_equivalents": profile.cost.get("full_forward_equivalents",
                                                                      profile.cost.get("full_forwards")),
                     "predicted_wall_s": round(est.flops / flops_per_s, 2),
                     "measured_wall_s": profile.cost["wall_time_s"], "predicted_gflops": round(est.flops / 1e9, 2),
                     "load_average_1min": round(os.getloadavg()[0], 1)})
        print(runs[-1], flush=True)
        # Written after every run so an interrupted benchmark still leaves its numbers.
        write_json(args.out, {"schema": "mi-opt/benchmark-profile-cost-model", "version": 1, "created": now(),
                              "model": "smollm2-135m", "n_samples": args.n_samples, "seq_len": args.seq_len,
                              "shape": vars(shape), "clean_forward_s": round(t_forward, 4),
                              "effective_gflops_per_s": round(flops_per_s / 1e9, 3), "runs": runs,
                              "runs_requested": args.runs, "machine": machine(), "versions": versions(),
                              "note": "shared CPU: wall times are noisy; forward equivalents are exact"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
