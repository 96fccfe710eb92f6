"""`mi-opt plan PROFILE.json`: turn importance scores and a budget into plan.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mi_opt.cli.eval import add_trust_arguments
from mi_opt.errors import MiOptError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="profile.json written by `mi-opt profile`")
    p.add_argument("--planner", default="layer-skip", help="layer-skip, head-prune, width-prune, joint-prune, combined, ... (see the registry)")
    p.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE",
                   help="budget option, repeatable: n_drop=6, target_fraction=0.8, fraction=0.33, n_heads=40; "
                        "width-prune / joint-prune: fraction=0.2 (of the decoder parameters), n_params=, bytes=; "
                        "combined: layer_skip.n_drop=6 head_prune.fraction=0.33")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="other planner option, same syntax: mode=free, metric=kl, iterative=true, protect_first=2")
    p.add_argument("--config", help="planner options as a JSON file (flags above override it)")
    p.add_argument("--model", help="model the profile scored (default: the spec recorded in the profile)")
    p.add_argument("--out", default="runs/plan.json", help="where to write the plan")
    add_trust_arguments(p)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(items: list[str], into: dict) -> dict:
    """KEY=VALUE pairs (dotted keys nest, values parsed as JSON when they are JSON) into a dict."""
    for item in items:
        if "=" not in item:
            raise MiOptError(f"expected KEY=VALUE, got {item!r} (e.g. --budget n_drop=6)")
        key, value = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = into
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MiOptError(f"option {key!r}: {part!r} is not a section")
        node[leaf] = _value(value.strip())
    return into


def _windows(profile, tokenizer):
    """The profile's calibration windows, rebuilt from what it recorded, for planners that measure
    (iterative layer-skip, bits sensitivity, joint-prune's candidates); None when the profile does not say."""
    from mi_opt.data import token_windows

    cal = profile.calibration
    if not cal.get("source") or not cal.get("n_samples") or not cal.get("seq_len"):
        return None
    try:
        return token_windows(tokenizer, cal["source"], cal["n_samples"], cal["seq_len"],
                             split=cal.get("split", "calibration"), seed=cal.get("seed", 0))
    except MiOptError:
        return None  # e.g. a text file that moved; planners that need windows say so themselves


def run(args: argparse.Namespace) -> int:
    from mi_opt.models import load_model
    from mi_opt.policy import PLANNERS, make_plan
    from mi_opt.profile.importance import ImportanceProfile

    profile = ImportanceProfile.load(args.profile)
    PLANNERS.get(args.planner)  # unknown names fail before the model loads
    config: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise MiOptError(f"--config {path} does not exist")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise MiOptError(f"--config {path} is not valid JSON: {err}") from err
    parse_options(args.budget + args.option, config)
    spec = args.model or profile.model.get("spec")
    if not spec:
        raise MiOptError("the profile records no model spec; pass --model")
    model, tokenizer = load_model(spec, trust_remote_code=args.trust_remote_code)
    windows = _windows(profile, tokenizer)
    plan = make_plan(profile, args.planner, config, model, windows=windows)
    plan.model["spec"] = spec
    plan.profile["path"] = str(Path(args.profile).resolve())
    path = plan.save(args.out)
    pred = plan.predicted
    print(f"plan: {path}")
    print(f"  drop layers: {plan.drop_layers or 'none'}")
    print(f"  prune heads: {sum(len(h) for h in plan.prune_heads.values())} in {len(plan.prune_heads)} layers "
          f"({plan.head_mode})")
    if plan.prune_neurons:
        print(f"  prune MLP neurons: {sum(len(n) for n in plan.prune_neurons.values())} in {len(plan.prune_neurons)} "
              f"layers ({plan.neuron_mode}), MLP sizes {sorted(set(pred.get('mlp_sizes', [])))}")
    if plan.bits:
        print(f"  bits: {len(plan.bits)} targets")
    for c in plan.planner.get("candidates", []):  # joint-prune: every mix it measured, so the choice is visible
        measured = (f"loss {c['loss']:.4f}, kl {c['kl']:.4f}" if "kl" in c else f"skipped: {c.get('skipped')}")
        print(f"  {'*' if c.get('chosen') else ' '} mix {c['mix']}: {measured}")
    print(f"  parameters: {pred['parameters_before']:,} -> {pred['parameters']:,} ({pred['parameter_fraction']:.1%})")
    return 0
