"""Does stacking ablations along the batch dimension pay? The fast engine with 1 vs k per replay.

    python benchmarks/stacking.py               # about 8 minutes on 2 cores; run nothing else meanwhile
    python benchmarks/stacking.py --k 2 3       # the stackings to compare with one ablation per replay

`AblationConfig.ablations_per_forward` stacks k ablations of a layer into one replay of k copies
of the batch. That saves per-call overhead but multiplies every activation by k, so whether it
pays depends on the machine's caches. This times `profile_ablation` (the real fast engine) on
SmolLM2 with each setting, interleaved: in each round every setting profiles the same units on
the same calibration batch, in a rotated order, so a slow stretch of the machine falls on all.
Units: every unit of three layers (early, middle, late), since a replay's cost depends on the
layer it starts at. The scores are checked equal across settings (stacking changes no number).
Writes reports/stacking.md and reports/stacking.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mi_opt.artifacts import machine, versions, write_json
from mi_opt.data import token_windows
from mi_opt.evaluate.cpu_load import shares, snapshot
from mi_opt.models import load
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.units import enumerate_units

REPORTS = Path(__file__).resolve().parent.parent / "reports"
KINDS = ("layer", "attn", "mlp", "head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 15, 28], help="layers whose units are timed")
    ap.add_argument("--k", type=int, nargs="+", default=[2], help="stackings compared with k=1")
    ap.add_argument("--rounds", type=int, default=5)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load(args.model)
    batch = token_windows(loaded.tokenizer, "handbook", args.batch_size, args.seq_len, seed=0)
    units = [u.key for u in enumerate_units(loaded.adapter, KINDS) if u.layer in args.layers]
    settings = [1, *[k for k in args.k if k != 1]]
    profile_ablation(loaded, batch, AblationConfig(unit_kinds=KINDS), units=units[:1], progress=False)  # warm-up
    times: dict[int, list[float]] = {k: [] for k in settings}
    scores, others = {}, []
    for r in tqdm(range(args.rounds), desc="rounds", unit="round"):
        order = settings[r % len(settings):] + settings[:r % len(settings)]
        for k in order:
            config = AblationConfig(unit_kinds=KINDS, batch_size=args.batch_size, ablations_per_forward=k)
            before, started = snapshot(), time.perf_counter()
            profile = profile_ablation(loaded, batch, config, units=units, progress=False)
            times[k].append(time.perf_counter() - started)
            load_share = shares(before, snapshot())
            others.append(load_share.others if load_share else None)
            scores[k] = {key: (s.delta_loss, s.kl) for key, s in profile.scores.items()}
    max_diff = max(abs(a - b) for k in settings for key in units
                   for a, b in zip(scores[k][key], scores[1][key]))
    result = {
        "schema": "mi-opt/benchmark-stacking", "version": 1, "command": " ".join(["python"] + sys.argv),
        "setting": {**vars(args), "units": len(units)},
        "seconds": {str(k): [round(t, 3) for t in v] for k, v in times.items()},
        "ratio_to_k1": {str(k): _ratios(times[k], times[1]) for k in settings if k != 1},
        "max_abs_score_difference": max_diff,
        "others_share_max": max((o for o in others if o is not None), default=None),
        "machine": machine(), "versions": versions(),
    }
    write_json(REPORTS / "stacking.json", result)
    (REPORTS / "stacking.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _ratios(stacked: list[float], single: list[float]) -> dict:
    """Per-round ratios (same round, so the same stretch of machine) and their median and range."""
    per_round = [s / o for s, o in zip(stacked, single)]
    return {"per_round": [round(x, 3) for x in per_round], "median": round(statistics.median(per_round), 3),
            "min": round(min(per_round), 3), "max": round(max(per_round), 3)}


def _markdown(r: dict) -> str:
    s = r["setting"]
    rows = "\n".join(f"| {k} | {statistics.median(v):.1f} | {min(v):.1f}-{max(v):.1f} | "
                     + (f"{r['ratio_to_k1'][k]['median']:.3f} ({r['ratio_to_k1'][k]['min']:.3f}-"
                        f"{r['ratio_to_k1'][k]['max']:.3f})" if k in r["ratio_to_k1"] else "1") + " |"
                     for k, v in r["seconds"].items())
    share = r["others_share_max"]
    return f"""# Stacking ablations in one replay: 1 vs k per forward

Command: `{r['command']}`

SmolLM2-135M, fp32, CPU ({r['machine']['cpu_count']} cores, {s['threads']} torch threads), one calibration
batch of {s['batch_size']} x {s['seq_len']} tokens, the {s['units']} units of layers {', '.join(map(str, s['layers']))}
(layer, attention, MLP, heads), zero ablation, {s['rounds']} interleaved rounds (order rotated).

| ablations per forward | median wall s | range | time / k=1's, same round: median (range) |
|---|---|---|---|
{rows}

Scores equal across settings to {r['max_abs_score_difference']:.1e}. Largest CPU share other processes
took during a timed call: {'n/a' if share is None else f'{share:.2f}'}.
"""


if __name__ == "__main__":
    raise SystemExit(main())
