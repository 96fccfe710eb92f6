"""Attribution patching (and the baselines) against full causal ablation on SmolLM2-135M.

    python benchmarks/attribution_vs_ablation.py [--n-samples 16] [--seq-len 256] [--skip-sublayers]

Measures each scorer's wall time and forward/backward count, and the Spearman and Kendall
rank correlation of its scores with exact ablation on heads and layers (and attn/mlp
sublayers unless skipped). Writes reports/attribution_vs_ablation.json after every stage,
so a long run that is interrupted keeps what it measured, and prints a Markdown table.
Wall times on a shared CPU are noisy; forward counts are not.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from scipy.stats import kendalltau, spearmanr

from mi_opt.artifacts import machine, versions, write_json
from mi_opt.data import token_windows
from mi_opt.models import load_model
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.profile.scorers import run_scorer

OUT = Path(__file__).resolve().parents[1] / "reports" / "attribution_vs_ablation.json"


def correlation(candidate, reference, kind: str, metric: str = "delta_loss") -> dict:
    keys = reference.units(kind)
    a = [candidate.score(k, metric) for k in keys]
    b = [reference.score(k, metric) for k in keys]
    return {"n": len(keys), "spearman": round(float(spearmanr(a, b)[0]), 4),
            "kendall": round(float(kendalltau(a, b)[0]), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ablation", default="zero", choices=["zero", "mean"])
    p.add_argument("--kl-samples", type=int, default=1, help="attribution's Hutchinson probes per batch (KL estimate)")
    p.add_argument("--skip-sublayers", action="store_true", help="do not ablate attn/mlp sublayers exactly")
    p.add_argument("--head-layer-stride", type=int, default=1,
                   help="ablate exactly only the heads of every k-th layer (the exact head sweep dominates the cost)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    model, tok = load_model("smollm2-135m")
    windows = token_windows(tok, "handbook", args.n_samples, args.seq_len, split="calibration")
    calibration = {"source": "handbook", "split": "calibration", "seed": 0}
    if args.head_layer_stride < 1:
        p.error("--head-layer-stride must be >= 1")
    result = {"schema": "mi-opt/benchmark-attribution-vs-ablation", "version": 1, "model": "smollm2-135m",
              "calibration": {**calibration, "n_samples": args.n_samples, "seq_len": args.seq_len},
              "ablation": args.ablation, "kl_samples": args.kl_samples, "head_layer_stride": args.head_layer_stride, "machine": machine(), "versions": versions(),
              "note": "CPU shared with other jobs while measured: wall times are noisy; counts are exact.",
              "costs": {}, "correlations": {}}

    def save():
        write_json(args.out, result)

    def score(name, kinds, units=None, **options):
        started = time.perf_counter()
        if units is None:
            prof = run_scorer(name, model, windows, {"unit_kinds": kinds, **options}, calibration=calibration,
                              model_spec="smollm2-135m")
        else:  # a subset of units: only the ablation profiler takes one
            prof = profile_ablation(model, windows, AblationConfig(unit_kinds=kinds, **options),
                                    calibration=calibration, model_spec="smollm2-135m", units=units)
        label = f"{name}[{','.join(kinds)}{'' if units is None else f' x{len(units)}'}]"
        result["costs"][label] = {**prof.cost, "measured_wall_s": round(time.perf_counter() - started, 2)}
        print(f"{label}: {result['costs'][label]}", flush=True)
        save()
        return prof

    abl_opts = {"ablation": args.ablation}
    attribution = score("attribution", ("layer", "attn", "mlp", "head"), kl_samples=args.kl_samples, **abl_opts)
    baselines = {name: score(name, ("layer",)) for name in ("block_influence", "angular_distance")}
    magnitude = score("weight_magnitude", ("layer", "attn", "mlp", "head"))
    exact = {"layer": score("ablation", ("layer",), **abl_opts)}
    report(result, args.out, attribution, baselines, magnitude, exact)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    heads = [f"L{i}.H{h}" for i in range(0, n_layers, args.head_layer_stride) for h in range(n_heads)]
    exact["head"] = score("ablation", ("head",), units=None if args.head_layer_stride == 1 else heads, **abl_opts)
    report(result, args.out, attribution, baselines, magnitude, exact)
    if not args.skip_sublayers:
        exact["attn"] = exact["mlp"] = score("ablation", ("attn", "mlp"), **abl_opts)
        report(result, args.out, attribution, baselines, magnitude, exact)
    print(f"\nwrote {args.out}")
    return 0


def report(result: dict, out: Path, attribution, baselines: dict, magnitude, exact: dict) -> None:
    """Correlations with every exact profile measured so far, saved and printed as Markdown."""
    corr = result["correlations"]
    for kind, reference in exact.items():
        corr[f"attribution/{kind}/delta_loss"] = correlation(attribution, reference, kind)
        corr[f"attribution/{kind}/kl"] = correlation(attribution, reference, kind, "kl")
        corr[f"weight_magnitude/{kind}/delta_loss"] = correlation(magnitude, reference, kind)
    for name, prof in baselines.items():
        corr[f"{name}/layer/delta_loss"] = correlation(prof, exact["layer"], "layer")
    write_json(out, result)

    print("\n| scorer vs exact ablation | units | metric | n | Spearman | Kendall |\n|---|---|---|---|---|---|")
    for key, c in corr.items():
        name, kind, metric = key.split("/")
        print(f"| {name} | {kind} | {metric} | {c['n']} | {c['spearman']:.3f} | {c['kendall']:.3f} |")
    print("\n| run | wall s | forwards | backwards | full-forward equivalents |\n|---|---|---|---|---|")
    for label, c in result["costs"].items():
        print(f"| {label} | {c['measured_wall_s']} | {c.get('forwards', '')} | {c.get('backwards', '')} | "
              f"{c.get('full_forward_equivalents', '')} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
