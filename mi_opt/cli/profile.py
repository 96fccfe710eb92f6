"""`mi-opt profile MODEL`: score every unit by causal ablation; write profile.json and plots."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mi_opt.cli.eval import add_trust_arguments
from mi_opt.errors import MiOptError
from mi_opt.units import KINDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m", help="bundled name, folder, .gguf or hub id")
    p.add_argument("--data", default="handbook", help="text source: handbook, kjv, a+b, file.txt/.jsonl, hf:NAME:SPLIT")
    p.add_argument("--n-samples", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward (standard errors are across batches)")
    p.add_argument("--ablation", choices=["zero", "mean"], default="zero")
    p.add_argument("--units", default=",".join(KINDS), help=f"comma list from {','.join(KINDS)}")
    p.add_argument("--engine", choices=["fast", "naive"], default="fast")
    p.add_argument("--ablations-per-forward", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (accelerate device_map)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-budget-mb", type=float, default=None,
                   help="memory for cached layer inputs; over it, fewer layers are cached (same scores, more compute)")
    p.add_argument("--shards", default=None,
                   help="shard folder for resumable / torchrun-sharded profiling (default OUT/shards under torchrun)")
    p.add_argument("--n-shards", type=int, default=None, help="number of shards (default: one per rank)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds ranks wait for each other")
    p.add_argument("--out", default="runs/profile", help="output folder")
    add_trust_arguments(p)


def run(args: argparse.Namespace) -> int:
    from mi_opt.data import token_windows
    from mi_opt.models import load_model
    from mi_opt.profile.ablation import AblationConfig, profile_ablation
    from mi_opt.profile.plots import head_heatmap, layer_bars

    from mi_opt.cli.run import _threads

    _threads(args.threads)
    config = AblationConfig(ablation=args.ablation, unit_kinds=tuple(u.strip() for u in args.units.split(",")),
                            batch_size=args.batch_size, ablations_per_forward=args.ablations_per_forward,
                            engine=args.engine, cache_budget_mb=args.cache_budget_mb)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MiOptError(f"--out {out} exists and is not a folder")
    from mi_opt.distributed import is_distributed, profile_distributed, rank_device

    device = args.device
    if is_distributed() and device.startswith("cuda"):
        device = str(rank_device())  # cuda:LOCAL_RANK, or every rank would land on cuda:0
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code)
    from mi_opt.arch import get_adapter

    windows = token_windows(tokenizer, args.data, args.n_samples, args.seq_len, split="calibration",
                            seed=args.seed, max_positions=get_adapter(model).max_positions())
    calibration = {"source": args.data, "split": "calibration", "seed": args.seed, "batch_size": args.batch_size,
                   "dtype": args.dtype, "device": args.device, "torch_threads": torch.get_num_threads()}
    if is_distributed() or args.shards:
        profile = profile_distributed(model, windows, config, Path(args.shards or out / "shards"),
                                      calibration=calibration, model_spec=args.model, n_shards=args.n_shards,
                                      timeout_s=args.timeout)
        if profile is None:  # ranks other than 0: rank 0 writes profile.json and the plots
            return 0
    else:
        profile = profile_ablation(model, windows, config, calibration=calibration, model_spec=args.model)
    path = profile.save(out / "profile.json")
    plots = [p for p in (head_heatmap(profile, out / "heads.png"), layer_bars(profile, out / "layers.png")) if p]
    print(f"profile: {path}  ({len(profile.scores)} units, {profile.cost['wall_time_s']:.0f} s, "
          f"base loss {profile.base_loss:.3f})")
    for plot in plots:
        print(f"plot:    {plot}")
    _print_summary(profile)
    return 0


def _print_summary(profile) -> None:
    for kind in ("layer", "head"):
        keys = sorted(profile.units(kind), key=lambda k: profile.score(k))
        if keys:
            print(f"least important {kind}s: {', '.join(keys[:5])}; most: {', '.join(keys[-3:][::-1])}")
