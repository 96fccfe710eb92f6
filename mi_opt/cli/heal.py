"""`mi-opt heal CHECKPOINT --teacher ORIGINAL --out DIR`: distill a compressed checkpoint back
toward the model it was compressed from, and export the healed checkpoint (verified by reload).

A killed heal resumes: rerun the same command and distillation continues from its last saved
step (the work folder sits next to --out until the heal finishes).
"""
from __future__ import annotations

import argparse
import shutil
from dataclasses import asdict
from pathlib import Path

from mi_opt.cli.eval import add_trust_arguments
from mi_opt.errors import MiOptError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="an mi-opt export (a folder with plan.json), e.g. runs/default/checkpoint")
    p.add_argument("--teacher", required=True, help="the original model the checkpoint was compressed from "
                   "(bundled name, folder, .gguf or hub id)")
    p.add_argument("--out", required=True, help="output folder for the healed checkpoint (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--method", help="local, distill or local+distill (default: distill)")
    p.add_argument("--train", help="localized, lora or all (default: localized)")
    p.add_argument("--steps", type=int, help="distillation optimizer steps")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other heal option (see mi_opt/heal/config.py): lr=1e-4, self_generated=0.25, radius=2")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sample", metavar="PROMPT", help="print a greedy continuation of PROMPT from the healed model")
    add_trust_arguments(p)


def heal_config(args: argparse.Namespace):
    from mi_opt.cli.plan import parse_options
    from mi_opt.heal import HealConfig
    from mi_opt.recipe import build

    options = parse_options(args.option, {})
    for key in ("method", "train", "steps"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return build(HealConfig, options, "heal")


def check_teacher(plan, teacher, teacher_tokenizer, teacher_fingerprint: str) -> None:
    """The plan records the fingerprint of the model it was made for (with or without its tokenizer)."""
    from mi_opt.artifacts import model_fingerprint

    expected = plan.model.get("fingerprint")
    if expected and expected != teacher_fingerprint and expected != model_fingerprint(teacher, teacher_tokenizer):
        raise MiOptError(f"--teacher is not the model this checkpoint was compressed from (the plan records "
                         f"{plan.model.get('spec') or '?'}, fingerprint {expected}); heal toward the original")


def run(args: argparse.Namespace) -> int:
    from mi_opt.artifacts import model_fingerprint
    from mi_opt.cli.apply import sample
    from mi_opt.cli.eval import load_any
    from mi_opt.export import export
    from mi_opt.heal import check_compatible, heal_
    from mi_opt.models import load_model
    from mi_opt.plan import CompressionPlan
    from mi_opt.profile.importance import ImportanceProfile
    from mi_opt.run import content_hash

    config = heal_config(args)  # bad options fail before any model is loaded
    out = Path(args.out)
    if out.exists() and not args.force:
        raise MiOptError(f"{out} already exists; choose another --out or pass --force")
    source = Path(args.checkpoint)
    if not (source / "plan.json").is_file():
        raise MiOptError(f"{source} is not an mi-opt export (no plan.json): heal a folder written by "
                         "`mi-opt apply` or `mi-opt run`")
    plan = CompressionPlan.load(source / "plan.json")
    profile = ImportanceProfile.load(source / "profile.json") if (source / "profile.json").is_file() else None
    student, tokenizer, _ = load_any(str(source), args.dtype, args.device, args.trust_remote_code)
    teacher, teacher_tokenizer = load_model(args.teacher, dtype=args.dtype, device=args.device,
                                            trust_remote_code=args.trust_remote_code)
    check_compatible(student, teacher, tokenizer, teacher_tokenizer)
    teacher_fingerprint = model_fingerprint(teacher)
    check_teacher(plan, teacher, teacher_tokenizer, teacher_fingerprint)
    # Keyed by what is healed toward what and how, so a rerun resumes only the same heal.
    key = content_hash(model_fingerprint(student), teacher_fingerprint, asdict(config))
    for stale in out.parent.glob(f"{out.name}.heal-work-*"):
        if stale.name != f"{out.name}.heal-work-{key}":
            shutil.rmtree(stale, ignore_errors=True)
    work = out.parent / f"{out.name}.heal-work-{key}"
    record = heal_(student, teacher, plan, config, tokenizer, work_dir=work)
    del teacher
    export(student, tokenizer, plan, out, profile=profile, force=args.force, heal=record)
    shutil.rmtree(work, ignore_errors=True)
    kl = record.kl_to_teacher
    print(f"healed: {out}  (KL to the teacher on training windows {kl['before']:.4f} -> {kl['after']:.4f}; "
          f"{record.cost['tokens']:,} tokens, {record.cost['wall_time_s']:.0f} s)")
    if args.sample:
        print(f"sample: {sample(student, tokenizer, args.sample)!r}")
    return 0
