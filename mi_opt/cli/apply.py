"""`mi-opt apply MODEL PLAN.json --out DIR`: compress for real and export a verified checkpoint
(`--format gguf`: one .gguf for llama.cpp, quantized per the plan by mi_opt.formats.gguf)."""
from __future__ import annotations

import argparse
from pathlib import Path

from mi_opt.cli.eval import add_trust_arguments
from mi_opt.errors import MiOptError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="bundled name, folder, .gguf or hub id (the model the plan was made for)")
    p.add_argument("plan", help="plan.json written by `mi-opt plan`")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--profile", help="profile.json to ship alongside (default: the one the plan records, if present)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sample", metavar="PROMPT", help="print a greedy continuation of PROMPT from the exported model")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "gguf"],
                   help="safetensors: a transformers/mi-opt checkpoint; gguf: one .gguf for llama.cpp")
    p.add_argument("--gguf-4bit", default="Q4_0", choices=["Q4_0", "Q4_1", "Q5_0", "Q5_1"],
                   help="GGML type of the plan's 4-bit modules (--format gguf)")
    p.add_argument("--gguf-quantizer", default="rtn", choices=["rtn", "gptq"],
                   help="with --format gguf: round-to-nearest (llama.cpp's own) or GPTQ for the Q4_0/Q5_0 blocks")
    p.add_argument("--gguf-float", default="F16", choices=["F16", "BF16", "F32"],
                   help="GGML type of the plan's 16-bit weights (--format gguf)")
    p.add_argument("--gguf-vocab", metavar="FILE.gguf",
                   help="copy tokenizer metadata from this GGUF (default: the source model's, when it is a GGUF)")
    add_trust_arguments(p)


def run(args: argparse.Namespace) -> int:
    from mi_opt.export import export
    from mi_opt.models import load_model
    from mi_opt.plan import CompressionPlan
    from mi_opt.profile.importance import ImportanceProfile
    from mi_opt.surgery import apply_

    out = Path(args.out)
    if out.exists() and not args.force:
        raise MiOptError(f"{out} already exists; choose another --out or pass --force")
    plan = CompressionPlan.load(args.plan)
    profile_path = args.profile or plan.profile.get("path")
    profile = ImportanceProfile.load(profile_path) if profile_path and Path(profile_path).is_file() else None
    if args.profile and profile is None:
        raise MiOptError(f"--profile {args.profile} does not exist")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code)
    from mi_opt.handle import parameter_count

    before = parameter_count(model)
    gguf = None
    if args.format == "gguf":
        from mi_opt.formats.gguf import apply_structure_
        from mi_opt.formats.gguf_families import check_plan_mlp_sizes
        from mi_opt.formats.gguf_types import GgufOptions

        gguf = GgufOptions(float_type=args.gguf_float, types={4: args.gguf_4bit}, vocab_from=args.gguf_vocab,
                           quantizer=args.gguf_quantizer)
        check_plan_mlp_sizes(model, plan)  # per-layer MLP sizes: refused before the surgery
        apply_structure_(model, plan)  # the GGUF writer quantizes from the unquantized weights
    else:
        apply_(model, plan)
    after = parameter_count(model)  # a packed 4-bit weight counts as the weights it holds
    export(model, tokenizer, plan, out, profile=profile, force=args.force, format=args.format, gguf=gguf)
    print(f"exported: {out}  (parameters {before:,} -> {after:,}, {after / before:.1%})")
    print(shapes_line(model))
    if args.format == "gguf":
        print(f"run with: llama-cli -m {out / gguf.file_name}")
        if args.sample:
            from transformers import AutoModelForCausalLM

            reread = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf.file_name).eval()  # the file's weights
            print(f"sample: {sample(reread, tokenizer, args.sample)!r}")
        return 0
    print(f"load with: {'AutoModelForCausalLM.from_pretrained' if _plain(out) else 'mi_opt.export.load_compressed'}"
          f"('{out}')")
    if args.sample:
        print(f"sample: {sample(model, tokenizer, args.sample)!r}")
    return 0


def shapes_line(model) -> str:
    """The compressed model's shapes: layers, query heads and MLP sizes per layer (one value when all agree)."""
    from mi_opt.export import describe

    shape = describe(model)

    def per_layer(values: list) -> str:
        return f"{values[0]} in every layer" if len(set(values)) == 1 else str(values)

    return (f"shapes: {shape['n_layers']} layers; query heads {per_layer([h for h, _ in shape['heads']])}; "
            f"MLP size {per_layer(shape['mlp_sizes'])}")


def _plain(out: Path) -> bool:
    import json

    from mi_opt.export import SIDECAR

    return json.loads((out / SIDECAR).read_text())["loader"] == "transformers"


def sample(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """A greedy continuation, using the chat template when the tokenizer has one."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    from mi_opt.arch import get_adapter

    ids = ids.to(get_adapter(model).input_device())
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
