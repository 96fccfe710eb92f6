"""`mi-opt profile MODEL`: score every unit (causal ablation, or any registered scorer); write
profile.json and plots. Defaults are the dataclasses' own (recipe DataSection, AblationConfig)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mi_opt.cli.eval import add_trust_arguments
from mi_opt.errors import MiOptError
from mi_opt.profile.ablation import ENGINES, AblationConfig
from mi_opt.profile.interventions import ABLATIONS
from mi_opt.recipe import DataSection
from mi_opt.units import KINDS, NEURON_GROUP

_DATA, _ABLATION = DataSection(), AblationConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m", help="bundled name, folder, .gguf or hub id")
    p.add_argument("--scorer", default="ablation",
                   help="a registered scorer (mi-opt validate lists them); the ablation flags below apply to "
                        "ablation, --option KEY=VALUE to any")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a scorer option (YAML value), repeatable, e.g. --option norm=l1")
    p.add_argument("--data", default=_DATA.calibration,
                   help="text source: handbook, kjv, a+b, file.txt/.jsonl, hf:NAME:SPLIT")
    p.add_argument("--n-samples", type=int, default=_DATA.n_samples, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=_DATA.seq_len, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"windows per forward (standard errors are across batches; ablation: {_ABLATION.batch_size})")
    p.add_argument("--ablation", choices=list(ABLATIONS), default=None, help=f"default {_ABLATION.ablation}")
    p.add_argument("--units", default=None, help=f"comma list from {','.join(KINDS)} (default: the scorer's)")
    p.add_argument("--neuron-group", type=int, default=None,
                   help=f"MLP neurons per 'neurons' unit (default {NEURON_GROUP}; scorers ablation, attribution, "
                        "activation, wanda)")
    p.add_argument("--engine", choices=list(ENGINES), default=None, help=f"default {_ABLATION.engine}")
    p.add_argument("--ablations-per-forward", type=int, default=None,
                   help=f"default {_ABLATION.ablations_per_forward}")
    p.add_argument("--seed", type=int, default=_DATA.seed)
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
    from mi_opt.models import load
    from mi_opt.profile.plots import head_heatmap, layer_bars
    from mi_opt.profile.scorers import SCORERS

    from mi_opt.cli.run import _threads

    _threads(args.threads)
    scorer = SCORERS.get(args.scorer)
    config = scorer.make_config(_scorer_options(args))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MiOptError(f"--out {out} exists and is not a folder")
    from mi_opt.distributed import is_distributed, profile_distributed, rank_device

    device = args.device
    if is_distributed() and device.startswith("cuda"):
        device = str(rank_device())  # cuda:LOCAL_RANK, or every rank would land on cuda:0
    loaded = load(args.model, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = token_windows(tokenizer, args.data, args.n_samples, args.seq_len, split="calibration",
                            seed=args.seed, max_positions=loaded.adapter.max_positions())
    batch_size = getattr(config, "batch_size", None)
    calibration = {"source": args.data, "split": "calibration", "seed": args.seed, "batch_size": batch_size,
                   "dtype": args.dtype, "device": args.device, "torch_threads": torch.get_num_threads()}
    if (is_distributed() or args.shards) and args.scorer != "ablation":
        raise MiOptError(f"sharded profiling runs the ablation scorer only; drop --shards (scorer {args.scorer!r})")
    if is_distributed() or args.shards:
        profile = profile_distributed(model, windows, config, Path(args.shards or out / "shards"),
                                      calibration=calibration, model_spec=args.model, n_shards=args.n_shards,
                                      timeout_s=args.timeout)
        if profile is None:  # ranks other than 0: rank 0 writes profile.json and the plots
            return 0
    else:
        profile = scorer(loaded, windows, config, calibration=calibration, model_spec=args.model)
    path = profile.save(out / "profile.json")
    plots = [p for p in (head_heatmap(profile, out / "heads.png"), layer_bars(profile, out / "layers.png")) if p]
    base = f", base loss {profile.base_loss:.3f}" if profile.base_loss is not None else ""
    print(f"profile: {path}  ({len(profile.scores)} units, {profile.cost['wall_time_s']:.0f} s{base})")
    for plot in plots:
        print(f"plot:    {plot}")
    _print_summary(profile)
    return 0


def _scorer_options(args: argparse.Namespace) -> dict:
    """The scorer's options: --option pairs, then the dedicated flags the user gave."""
    import yaml

    options = {}
    for pair in args.option:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise MiOptError(f"--option {pair!r}: write KEY=VALUE, e.g. --option batch_size=8")
        options[key.strip()] = yaml.safe_load(value)
    flags = {"ablation": args.ablation, "unit_kinds": args.units, "batch_size": args.batch_size,
             "ablations_per_forward": args.ablations_per_forward, "engine": args.engine,
             "cache_budget_mb": args.cache_budget_mb, "neuron_group": args.neuron_group}
    options.update({k: v for k, v in flags.items() if v is not None})
    return options


def _print_summary(profile) -> None:
    for kind, plural in (("layer", "layers"), ("head", "heads"), ("neurons", "neuron groups")):
        keys = sorted(profile.units(kind), key=lambda k: profile.score(k))
        if keys:
            print(f"least important {plural}: {', '.join(keys[:5])}; most: {', '.join(keys[-3:][::-1])}")
