"""Wall time of the fast ablation engine against the naive one-forward-per-unit loop.

    python benchmarks/profile_cost.py                      # the issue's setting (long: see below)
    python benchmarks/profile_cost.py --naive-every 10     # naive timed on every 10th unit

Setting: SmolLM2-135M, fp32, CPU, 2 torch threads, 16 x 256 calibration tokens of the bundled
handbook, 30 layers + 30 attention + 30 MLP + 270 head units, zero ablation.

The naive loop costs the same for every unit (one full forward), so by default it is timed on
an evenly spaced sample of units and scaled to the full set; its scores on that sample are
also checked against the fast engine's. `--naive-every 1` times the whole naive loop.
Writes reports/profile_cost.md and reports/profile_cost.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from mi_opt.artifacts import machine, versions, write_json
from mi_opt.data import token_windows
from mi_opt.models import load_model
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.units import parse_unit

REPORTS = Path(__file__).resolve().parent.parent / "reports"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ablations-per-forward", type=int, default=2)
    ap.add_argument("--naive-every", type=int, default=10, help="time the naive loop on every k-th unit")
    ap.add_argument("--layer-every", type=int, default=1,
                    help="profile only every k-th layer's units with both engines (quick looks only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    windows = token_windows(tok, "handbook", args.n_samples, args.seq_len, seed=0)
    kinds = ("layer", "attn", "mlp", "head")
    base = dict(unit_kinds=kinds, batch_size=args.batch_size)

    fast_cfg = AblationConfig(engine="fast", ablations_per_forward=args.ablations_per_forward, **base)
    all_units = [u for u in _units(model, kinds) if parse_unit(u).layer % args.layer_every == 0]
    started = time.perf_counter()
    fast = profile_ablation(model, windows, fast_cfg, units=all_units)
    fast_s = time.perf_counter() - started

    sample = all_units[::args.naive_every]
    started = time.perf_counter()
    naive = profile_ablation(model, windows, AblationConfig(engine="naive", **base), units=sample)
    naive_sample_s = time.perf_counter() - started
    naive_s = naive_sample_s * len(all_units) / len(sample)
    max_diff = max(max(abs(naive.scores[k].delta_loss - fast.scores[k].delta_loss),
                       abs(naive.scores[k].kl - fast.scores[k].kl)) for k in naive.scores)
    result = {
        "schema": "mi-opt/benchmark-profile-cost", "version": 1, "command": " ".join(["python"] + sys.argv),
        "setting": {**vars(args), "units": len(all_units), "naive_units_timed": len(sample)},
        "fast_wall_s": round(fast_s, 1), "naive_wall_s": round(naive_s, 1),
        "naive_measured_wall_s": round(naive_sample_s, 1), "ratio_fast_over_naive": round(fast_s / naive_s, 3),
        "fast_full_forward_equivalents": fast.cost.get("full_forward_equivalents"),
        "max_abs_score_difference": max_diff, "machine": machine(), "versions": versions(),
    }
    write_json(REPORTS / "profile_cost.json", result)
    (REPORTS / "profile_cost.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _units(model, kinds):
    from mi_opt.arch import get_adapter
    from mi_opt.units import enumerate_units

    return [u.key for u in enumerate_units(get_adapter(model), kinds)]


def _markdown(r: dict) -> str:
    s = r["setting"]
    return f"""# Profiling cost: fast engine vs naive loop

Command: `{r['command']}`

SmolLM2-135M, fp32, CPU ({r['machine']['cpu_count']} cores, {s['threads']} torch threads),
{s['n_samples']} x {s['seq_len']} calibration tokens, batch {s['batch_size']}, {s['units']} units
(layers, attention and MLP sublayers, heads), zero ablation.

| engine | wall time (s) | note |
|---|---|---|
| naive (one full forward per unit) | {r['naive_wall_s']} | timed on {s['naive_units_timed']} evenly spaced units ({r['naive_measured_wall_s']} s), scaled to {s['units']}; each unit costs one full forward |
| fast (cached residuals, {s['ablations_per_forward']} ablations per forward, folded KL) | {r['fast_wall_s']} | all {s['units']} units; {r['fast_full_forward_equivalents']:.0f} full-forward equivalents of decoder layers |

**Ratio fast / naive: {r['ratio_fast_over_naive']}** (target 0.5 or lower).
Largest score difference between the engines on the timed units: {r['max_abs_score_difference']:.2e}.
"""


if __name__ == "__main__":
    raise SystemExit(main())
