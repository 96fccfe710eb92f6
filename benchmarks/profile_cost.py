"""Wall time of the fast ablation engine against the naive one-forward-per-unit loop.

    python benchmarks/profile_cost.py                      # the issue's setting: all 360 units, both engines
    python benchmarks/profile_cost.py --naive-every 10     # quick look: naive timed on every 10th unit, scaled

Setting: SmolLM2-135M, fp32, CPU, 2 torch threads, 16 x 256 calibration tokens of the bundled
handbook, 30 layers + 30 attention + 30 MLP + 270 head units, zero ablation.

By default both engines score every unit (about 1.5 hours on 2 cores: 28 min fast, 59 naive) and
their scores are compared unit by unit. The engines take turns, one calibration batch at a time
(fast on batch 1, naive on batch 1, fast on batch 2, ...): each batch is a complete profile of
every unit, so the turns do the same work as two whole runs, and a slow or busy stretch of the
machine falls on both engines instead of one. Around every turn the share of CPU time other
processes took is read (mi_opt/evaluate/cpu_load.py) and reported. Each finished turn is kept
under ~/.cache/mi-opt/profile_cost/, keyed by the setting and the source of the profiling code,
so a session cut short resumes at the next turn, and a rerun with another
--ablations-per-forward reuses the naive turns. Run nothing else meanwhile: this is a wall-time
comparison.
Writes reports/profile_cost.md and reports/profile_cost.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from mi_opt.artifacts import machine, versions, write_json
from mi_opt.data import token_windows
from mi_opt.evaluate import cpu_load
from mi_opt.models import load_model
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.units import parse_unit

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
CACHE = Path.home() / ".cache" / "mi-opt" / "profile_cost"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ablations-per-forward", type=int, default=AblationConfig.ablations_per_forward)
    ap.add_argument("--naive-every", type=int, default=1,
                    help="time the naive loop on every k-th unit and scale (1: every unit, measured)")
    ap.add_argument("--layer-every", type=int, default=1,
                    help="profile only every k-th layer's units with both engines (quick looks only)")
    return ap.parse_args(argv)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    windows = token_windows(tok, "handbook", args.n_samples, args.seq_len, seed=0)
    kinds = ("layer", "attn", "mlp", "head")
    base = dict(unit_kinds=kinds, batch_size=args.batch_size)

    fast_cfg = AblationConfig(engine="fast", ablations_per_forward=args.ablations_per_forward, **base)
    naive_cfg = AblationConfig(engine="naive", **base)
    all_units = [u for u in _units(model, kinds) if parse_unit(u).layer % args.layer_every == 0]
    sample = all_units[::args.naive_every]
    fast_cache, naive_cache = cache_paths(args)
    with torch.inference_mode():  # first-call costs (allocator, kernels' setup) fall on no engine's turn
        model(windows[:args.batch_size], use_cache=False)
    fast, naive = [], []
    for b, start in enumerate(range(0, len(windows), args.batch_size)):   # the engines take turns
        batch = windows[start:start + args.batch_size]
        fast.append(_timed_turn(model, batch, fast_cfg, all_units, fast_cache.with_suffix(f".batch{b}.json")))
        naive.append(_timed_turn(model, batch, naive_cfg, sample, naive_cache.with_suffix(f".batch{b}.json")))
    fast_s, naive_sample_s = sum(t["wall_s"] for t in fast), sum(t["wall_s"] for t in naive)
    fast_scores, naive_scores = _mean_scores(fast), _mean_scores(naive)
    naive_s = naive_sample_s * len(all_units) / len(sample)
    max_diff = max(max(abs(naive_scores[k]["delta_loss"] - fast_scores[k]["delta_loss"]),
                       abs(naive_scores[k]["kl"] - fast_scores[k]["kl"])) for k in naive_scores)
    result = {
        "schema": "mi-opt/benchmark-profile-cost", "version": 2, "command": " ".join(["python"] + sys.argv),
        "setting": {**vars(args), "units": len(all_units), "naive_units_timed": len(sample)},
        "fast_wall_s": round(fast_s, 1), "naive_wall_s": round(naive_s, 1),
        "naive_measured_wall_s": round(naive_sample_s, 1), "ratio_fast_over_naive": round(fast_s / naive_s, 3),
        "fast_full_forward_equivalents": sum(t["cost"]["full_forward_equivalents"] for t in fast),
        "turns": [{"batch": b, "fast_wall_s": round(f["wall_s"], 1), "naive_wall_s": round(n["wall_s"], 1),
                   "fast_others_share": f.get("others_share"), "naive_others_share": n.get("others_share")}
                  for b, (f, n) in enumerate(zip(fast, naive))],
        "max_abs_score_difference": max_diff, "machine": machine(), "versions": versions(),
    }
    write_json(REPORTS / "profile_cost.json", result)
    (REPORTS / "profile_cost.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def cache_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """Where the fast and the naive engine's finished runs for this setting are kept."""
    setting = {k: v for k, v in vars(args).items() if k != "ablations_per_forward"}
    return CACHE / f"{_key(setting, args.ablations_per_forward)}-fast.json", CACHE / f"{_key(setting)}-naive.json"


def _key(*parts) -> str:
    """A finished run's cache name: the setting (the naive loop's leaves out what only the fast
    engine reads) and the source of the code that runs, so commits elsewhere keep it valid."""
    sources = [ROOT / "mi_opt" / "profile" / f for f in ("ablation.py", "engine.py", "interventions.py")]
    sources.append(ROOT / "mi_opt" / "hooks.py")
    text = json.dumps([parts, [f.read_text() for f in sources], versions().get("torch")], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _timed_turn(model, batch: torch.Tensor, config: AblationConfig, units: list[str], cache: Path) -> dict:
    """Wall seconds, per-unit scores, cost and others' CPU share of one engine on one calibration
    batch; read from `cache` when that turn finished before."""
    if cache.exists():
        kept = json.loads(cache.read_text())
        print(f"{config.engine} engine: reusing the finished turn in {cache} ({kept['wall_s']:.1f} s)")
        return kept
    before, started = cpu_load.snapshot(), time.perf_counter()
    profile = profile_ablation(model, batch, config, units=units)
    wall_s = time.perf_counter() - started
    load = cpu_load.shares(before, cpu_load.snapshot())
    turn = {"wall_s": wall_s, "cost": profile.cost, "others_share": round(load.others, 3) if load else None,
            "scores": {k: {"delta_loss": v.delta_loss, "kl": v.kl} for k, v in profile.scores.items()}}
    write_json(cache, turn)
    return turn


def _mean_scores(turns: list[dict]) -> dict[str, dict[str, float]]:
    """Each unit's scores averaged over the batches: what one run over all windows reports."""
    return {k: {m: sum(t["scores"][k][m] for t in turns) / len(turns) for m in ("delta_loss", "kl")}
            for k in turns[0]["scores"]}


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
| naive (one full forward per unit) | {r['naive_wall_s']} | {_naive_note(r)} |
| fast (cached residuals and attention outputs, {_per_forward(s['ablations_per_forward'])}, folded KL over vocabulary blocks) | {r['fast_wall_s']} | all {s['units']} units; {r['fast_full_forward_equivalents']:.0f} full-forward equivalents of decoder layers |

**Ratio fast / naive: {r['ratio_fast_over_naive']}** (target 0.5 or lower).
Largest score difference between the engines on the timed units: {r['max_abs_score_difference']:.2e}.

The engines took turns, one calibration batch each (a complete profile of every unit on that
batch), so a slow stretch of the machine falls on both:

| batch | fast (s) | naive (s) | ratio | CPU share of other processes (fast, naive) |
|---|---|---|---|---|
{_turn_rows(r)}
"""


def _turn_rows(r: dict) -> str:
    share = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    scale = r["setting"]["units"] / r["setting"]["naive_units_timed"]   # naive timed on a sample: scaled
    return "\n".join(f"| {t['batch'] + 1} | {t['fast_wall_s']} | {t['naive_wall_s']} | "
                     f"{t['fast_wall_s'] / (t['naive_wall_s'] * scale):.3f} | {share(t['fast_others_share'])}, "
                     f"{share(t['naive_others_share'])} |" for t in r["turns"])


def _per_forward(k: int) -> str:
    return "one ablation per replay" if k == 1 else f"{k} ablations stacked per replay"


def _naive_note(r: dict) -> str:
    s = r["setting"]
    if s["naive_units_timed"] == s["units"]:
        return f"all {s['units']} units, measured; each unit costs one full forward"
    return (f"timed on {s['naive_units_timed']} evenly spaced units ({r['naive_measured_wall_s']} s), "
            f"scaled to {s['units']}; each unit costs one full forward")


if __name__ == "__main__":
    raise SystemExit(main())
