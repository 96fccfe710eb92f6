"""Cheap MLP neuron-group scorers against exact group ablation on SmolLM2-135M.

    OMP_NUM_THREADS=1 python benchmarks/neuron_scorers.py [--layer-stride 5] [--no-zero]

Scores every neuron group (64 neurons by default: 30 layers x 24 groups) with each cheap
scorer (activation, wanda, wanda with input rows, attribution), and ablates exactly, with
the replay engine, the groups of every `--layer-stride`-th layer only (all 720 groups are too
slow on a CPU): mean ablation, and zero ablation unless --no-zero. Reports, per measured layer
and pooled over all measured groups, the Spearman and Kendall correlation of each cheap score
with exact ablation's delta loss (attribution estimates the same ablation kind it is compared
with), and each scorer's wall time and its ratio to exact ablation's: measured on the subset,
and extrapolated to all groups by replay cost (a group of layer L replays layers L..end).

Resumable: each finished profile is cached under --cache and skipped on a rerun; the report
(reports/neuron_scorers.json and .md) is rewritten after every stage. Wall times on a shared
CPU are noisy; forward counts are not.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from scipy.stats import kendalltau, spearmanr

from mi_opt.artifacts import machine, versions, write_json
from mi_opt.data import token_windows
from mi_opt.models import load_model
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.profile.scorers import run_scorer
from mi_opt.units import parse_unit

REPORTS = Path(__file__).resolve().parents[1] / "reports"
TARGET_SPEARMAN, TARGET_COST_RATIO = 0.8, 1 / 30  # the target for a cheap neuron scorer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--neuron-group", type=int, default=64)
    p.add_argument("--layer-stride", type=int, default=5, help="ablate exactly the groups of every k-th layer")
    p.add_argument("--no-zero", action="store_true", help="skip exact zero ablation (and zero attribution)")
    p.add_argument("--cache", type=Path, default=REPORTS / "neuron_scorers")
    p.add_argument("--out", type=Path, default=REPORTS / "neuron_scorers.json")
    return p.parse_args(argv)


class Bench:
    """Profiles cached one file each, so an interrupted run resumes where it stopped."""

    def __init__(self, args, model, windows, calibration):
        self.args, self.model, self.windows, self.calibration = args, model, windows, calibration
        args.cache.mkdir(parents=True, exist_ok=True)

    def profile(self, label: str, scorer: str, options: dict, units: list[str] | None = None) -> ImportanceProfile:
        path = self.args.cache / f"{label}.json"
        if path.exists():
            print(f"{label}: cached", flush=True)
            return ImportanceProfile.load(path)
        started = time.perf_counter()
        prof = run_scorer(scorer, self.model, self.windows, {"batch_size": self.args.batch_size,
                                                             "neuron_group": self.args.neuron_group,
                                                             "unit_kinds": ["neurons"], **options},
                          calibration=self.calibration, model_spec="smollm2-135m", units=units)
        prof.cost["measured_wall_s"] = round(time.perf_counter() - started, 2)
        prof.save(path)
        print(f"{label}: {prof.cost}", flush=True)
        return prof


def correlations(cheap: ImportanceProfile, exact: ImportanceProfile) -> dict:
    keys = exact.units("neurons")
    by_layer: dict[int, list[str]] = {}
    for k in keys:
        by_layer.setdefault(parse_unit(k).layer, []).append(k)

    def corr(ks):
        a, b = [cheap.score(k) for k in ks], [exact.score(k) for k in ks]
        return {"n": len(ks), "spearman": round(float(spearmanr(a, b)[0]), 4),
                "kendall": round(float(kendalltau(a, b)[0]), 4)}
    per_layer = {str(layer): corr(ks) for layer, ks in sorted(by_layer.items())}
    mean = lambda m: round(sum(c[m] for c in per_layer.values()) / len(per_layer), 4)  # noqa: E731
    # Layer 0's MLP is the least linear place in a model (its groups matter most when ablated):
    # the pooled figure without it says how much of the disagreement sits there.
    later = [k for k in keys if parse_unit(k).layer != 0]
    return {"pooled": corr(keys), "pooled_without_layer_0": corr(later) if later else None, "per_layer": per_layer,
            "mean_per_layer": {"spearman": mean("spearman"), "kendall": mean("kendall")}}


def replay_share(layers: list[int], n_layers: int, groups_per_layer: int) -> float:
    """Replayed layers of ablating every group of `layers` (a group of layer L reruns L..end)."""
    return sum((n_layers - layer) * groups_per_layer for layer in layers)


def main(argv=None) -> int:
    args = parse_args(argv)
    model, tok = load_model("smollm2-135m")
    windows = token_windows(tok, "handbook", args.n_samples, args.seq_len, split="calibration")
    calibration = {"source": "handbook", "split": "calibration", "seed": 0}
    bench = Bench(args, model, windows, calibration)
    n_layers = model.config.num_hidden_layers
    width = model.config.intermediate_size
    groups = -(-width // args.neuron_group)
    layers = list(range(0, n_layers, args.layer_stride))
    subset = [f"L{i}.mlp.N{j}-{min(j + args.neuron_group, width) - 1}" for i in layers
              for j in range(0, width, args.neuron_group)]
    result = {"schema": "mi-opt/benchmark-neuron-scorers", "version": 1, "model": "smollm2-135m",
              "calibration": {**calibration, "n_samples": args.n_samples, "seq_len": args.seq_len,
                              "batch_size": args.batch_size},
              "neuron_group": args.neuron_group, "groups_per_layer": groups, "n_layers": n_layers,
              "measured_layers": layers, "n_measured_groups": len(subset),
              "extrapolation_factor": round(replay_share(list(range(n_layers)), n_layers, groups)
                                            / replay_share(layers, n_layers, groups), 4),
              "target": {"spearman": TARGET_SPEARMAN, "cost_ratio": TARGET_COST_RATIO},
              "machine": machine(), "versions": versions(),
              "note": "Exact ablation of every layer-stride-th layer's groups only; the cheap scorers score all "
                      "groups and are compared on those. CPU shared with other jobs: wall times are noisy.",
              "costs": {}, "correlations": {}}
    if args.no_zero:
        result["note"] += " Exact zero ablation was not run (--no-zero): mean ablation only."

    cheap = {"activation": bench.profile("activation", "activation", {}),
             "wanda": bench.profile("wanda", "wanda", {}),
             "wanda+inputs": bench.profile("wanda+inputs", "wanda", {"input_rows": True}),
             "attribution[mean]": bench.profile("attribution[mean]", "attribution", {"ablation": "mean"})}
    report(result, args.out, cheap, {})
    exact = {"mean": bench.profile("ablation[mean]", "ablation", {"ablation": "mean"}, units=subset)}
    report(result, args.out, cheap, exact)
    if not args.no_zero:
        cheap["attribution[zero]"] = bench.profile("attribution[zero]", "attribution", {"ablation": "zero"})
        exact["zero"] = bench.profile("ablation[zero]", "ablation", {"ablation": "zero"}, units=subset)
        report(result, args.out, cheap, exact)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def report(result: dict, out: Path, cheap: dict, exact: dict) -> None:
    for name, prof in {**cheap, **{f"ablation[{k}]": v for k, v in exact.items()}}.items():
        result["costs"][name] = {k: prof.cost.get(k) for k in ("wall_time_s", "measured_wall_s", "forwards",
                                                               "backwards", "full_forward_equivalents", "n_units")}
    for kind, ref in exact.items():
        for name, prof in cheap.items():
            if name.startswith("attribution[") and name != f"attribution[{kind}]":
                continue  # attribution estimates one ablation kind: compare it with that one
            result["correlations"][f"{name} vs ablation[{kind}]"] = correlations(prof, ref)
        estimate = cheap.get(f"attribution[{kind}]")
        if estimate is not None:  # where first order fails: the groups whose exact ablation hurts most
            top = sorted(ref.units("neurons"), key=lambda k: -ref.score(k))[:6]
            result.setdefault("largest_exact", {})[kind] = [
                {"unit": k, "exact": round(ref.score(k), 5), "attribution": round(estimate.score(k), 5)} for k in top]
    write_json(out, result)
    out.with_suffix(".md").write_text(render(result))


def render(r: dict) -> str:
    lines = [f"# Cheap neuron-group scorers vs exact group ablation ({r['model']})", "",
             f"Groups of {r['neuron_group']} MLP neurons ({r['groups_per_layer']} per layer, "
             f"{r['groups_per_layer'] * r['n_layers']} in all). Calibration: {r['calibration']['n_samples']} windows x "
             f"{r['calibration']['seq_len']} tokens of {r['calibration']['source']} ({r['calibration']['split']} split). "
             f"Exact ablation (replay engine) of the {r['n_measured_groups']} groups of layers "
             f"{', '.join(map(str, r['measured_layers']))} only: all groups are too slow on this CPU. The cheap "
             "scorers score every group; correlations are on the measured groups, against exact delta loss.", ""]
    costs = r["costs"]
    exact_wall = {k: c["wall_time_s"] for k, c in costs.items() if k.startswith("ablation[")}
    if r["correlations"]:
        lines += ["| scorer | vs | pooled Spearman | pooled Kendall | pooled Spearman without L0 | mean per-layer "
                  "Spearman | mean per-layer Kendall | wall s | cost / exact (subset) | cost / exact (all groups, "
                  "extrapolated) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for key, c in r["correlations"].items():
            name, ref = key.split(" vs ")
            wall, ref_wall = costs[name]["wall_time_s"], exact_wall[ref]
            no_l0 = f"{c['pooled_without_layer_0']['spearman']:.3f}" if c.get("pooled_without_layer_0") else "-"
            lines.append(f"| {name} | {ref} | {c['pooled']['spearman']:.3f} | {c['pooled']['kendall']:.3f} | {no_l0} | "
                         f"{c['mean_per_layer']['spearman']:.3f} | {c['mean_per_layer']['kendall']:.3f} | {wall:.1f} | "
                         f"1/{ref_wall / wall:.0f} | 1/{ref_wall * r['extrapolation_factor'] / wall:.0f} |")
        lines += ["", "Per layer (Spearman / Kendall, n = groups per layer):", "",
                  "| scorer | vs | " + " | ".join(f"L{i}" for i in r["measured_layers"]) + " |",
                  "|---|---|" + "---|" * len(r["measured_layers"])]
        for key, c in r["correlations"].items():
            name, ref = key.split(" vs ")
            lines.append(f"| {name} | {ref} | " + " | ".join(
                f"{v['spearman']:.2f} / {v['kendall']:.2f}" for v in c["per_layer"].values()) + " |")
        lines += ["", target_line(r, exact_wall)]
        for kind, top in r.get("largest_exact", {}).items():
            lines += ["", f"The groups whose exact {kind} ablation raises the loss most, with attribution's estimate "
                      "(nats): " + "; ".join(f"{t['unit']} {t['exact']:.4f} vs {t['attribution']:.4f}" for t in top)
                      + ". Where they cluster in one layer, that layer is where the first-order estimate fails."]
    lines += ["", "| run | wall s | forwards | backwards | full-forward equivalents | units |", "|---|---|---|---|---|---|"]
    for name, c in costs.items():
        lines.append(f"| {name} | {c['wall_time_s']} | {c['forwards'] if c['forwards'] is not None else '-'} | "
                     f"{c['backwards'] if c['backwards'] is not None else '-'} | "
                     f"{c['full_forward_equivalents'] if c['full_forward_equivalents'] is not None else '-'} | "
                     f"{c['n_units']} |")
    lines += ["", f"Cost ratios: the cheap scorer's wall time (all {r['groups_per_layer'] * r['n_layers']} groups) over "
              "exact ablation's, measured on the subset, and extrapolated to all groups by replayed layers "
              f"(x{r['extrapolation_factor']}: a group of layer L reruns layers L..{r['n_layers'] - 1}). "
              f"Target (the issue): Spearman >= {r['target']['spearman']} at <= 1/30 of exact ablation's cost.",
              "", r["note"], ""]
    return "\n".join(lines)


def target_line(r: dict, exact_wall: dict) -> str:
    """The issue's target, judged on the pooled and on the per-layer figure (they differ)."""
    out = []
    for label, pick in (("pooled", lambda c: c["pooled"]["spearman"]),
                        ("mean per-layer", lambda c: c["mean_per_layer"]["spearman"])):
        best = None
        for key, c in r["correlations"].items():
            name, ref = key.split(" vs ")
            ratio = r["costs"][name]["wall_time_s"] / (exact_wall[ref] * r["extrapolation_factor"])
            if best is None or pick(c) > best[1]:
                best = (key, pick(c), ratio)
        key, rho, ratio = best
        met = rho >= r["target"]["spearman"] and ratio <= r["target"]["cost_ratio"]
        out.append(f"Target on the {label} Spearman {'met' if met else 'NOT met'}: best {rho:.3f} ({key}) at "
                   f"1/{1 / ratio:.0f} of exact ablation's extrapolated cost for all groups.")
    return "  \n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
