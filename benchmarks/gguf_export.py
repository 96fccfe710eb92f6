"""GGUF exports of the bundled SmolLM2: file size and perplexity of each file as transformers reads it.

    python benchmarks/gguf_export.py            # resumable: finished rows are kept in reports/gguf_export.json

Each row exports the bundled model (its plan's structure applied first, nothing else) with
`export(..., format="gguf")`, which verifies the file by a transformers reload, then reads the
file back with `from_pretrained(gguf_file=...)` and measures perplexity on the recipes'
evaluation windows (handbook + KJV, 16 x 256 tokens), keeping the per-window sums so that each
file's change from the original is paired over the same windows (bootstrap interval, * when it
excludes 0). The README's GGUF table comes from here. A row without per-window sums (made before
they were kept) is measured again.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from mi_opt.artifacts import machine, versions, write_json
from mi_opt.evaluate.paired import change_text, pairable_perplexity, perplexity_change
from mi_opt.evaluate.perplexity import perplexity
from mi_opt.export import export
from mi_opt.formats.gguf import apply_structure_
from mi_opt.formats.gguf_types import GgufOptions
from mi_opt.models import load_model
from mi_opt.plan import CompressionPlan

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "reports" / "gguf_export.json"
MIX = ROOT / "reports" / "recipes" / "bits-4-8-mix" / "plan.json"
N_LAYERS = 30


def _uniform(width: int, embed: int = 16) -> dict:
    bits = {f"L{i}": width for i in range(N_LAYERS)}
    return {**bits, "embed": embed, "lm_head": embed} if embed < 16 else bits


def _mix(embed: int = 16) -> dict:
    bits = dict(CompressionPlan.load(MIX).bits)
    return {**bits, "embed": embed, "lm_head": embed} if embed < 16 else bits


# row name -> (plan bits, GGUF options)
ROWS = {
    "F16 everything": (lambda: {}, {}),
    "Q8_0 linears and embedding": (lambda: _uniform(8, 8), {}),
    "Q4_0 linears, F16 embedding": (lambda: _uniform(4), {}),
    "Q4_0 linears, Q8_0 embedding": (lambda: _uniform(4, 8), {}),
    "Q4_1 linears, Q8_0 embedding (the bundle's own types)": (lambda: _uniform(4, 8), {"types": {4: "Q4_1"}}),
    "bits-4-8-mix plan (4 -> Q4_0, 8 -> Q8_0, 16 -> F16), F16 embedding": (_mix, {}),
    "bits-4-8-mix plan, Q8_0 embedding": (lambda: _mix(8), {}),
    "bits-4-8-mix plan with 4 -> Q4_1, Q8_0 embedding": (lambda: _mix(8), {"types": {4: "Q4_1"}}),
}


def measure_perplexity(model, tokenizer) -> dict:
    return pairable_perplexity(perplexity(model, tokenizer, "handbook+kjv", 16, 256, 4, 0, progress=False))


def measure_row(name: str, original, tokenizer) -> dict:
    from transformers import AutoModelForCausalLM

    bits, options = ROWS[name]
    plan = CompressionPlan(model={"n_layers": N_LAYERS, "spec": "smollm2-135m"}, bits=bits())
    model = apply_structure_(copy.deepcopy(original), plan)
    with tempfile.TemporaryDirectory(prefix="mi-opt-gguf-bench-") as tmp:
        started = time.perf_counter()
        out = export(model, tokenizer, plan, Path(tmp) / "out", format="gguf", gguf=GgufOptions(**options))
        export_s = time.perf_counter() - started
        size = (out / "model.gguf").stat().st_size
        reread = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
        ppl = measure_perplexity(reread, tokenizer)
    return {"file_mb": round(size / 1e6, 1), **ppl, "export_s": round(export_s, 1)}


def render(data: dict) -> Path:
    lines = ["# GGUF exports of SmolLM2-135M-Instruct", "",
             "Made by `python benchmarks/gguf_export.py`. Perplexity of each file as transformers reads it "
             f"(`gguf_file=`), on 16 x 256 evaluation windows of handbook + KJV; the original: "
             f"{data['original']['perplexity']:.3f}. Change: paired over the same windows, 95% bootstrap "
             "interval, * when it excludes 0.", "",
             "| GGUF export | file | perplexity | change from the original | export s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['file_mb']} MB | {r['perplexity']:.3f} | "
              f"{change_text(perplexity_change(data['original'], r), 3) or '-'} | {r['export_s']:.0f} |"
              for name, r in data["rows"].items()]
    path = OUT.with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = json.loads(OUT.read_text()) if OUT.exists() else {"rows": {}}
    original, tokenizer = load_model("smollm2-135m")
    if "window_nll_sum" not in data.get("original", {}):
        data["original"] = measure_perplexity(original, tokenizer)
    for name in ROWS:
        if "window_nll_sum" in data["rows"].get(name, {}):
            continue
        print(f"row {name}", flush=True)
        data["rows"][name] = measure_row(name, original, tokenizer)
        data.update(machine=machine(), versions=versions())
        write_json(OUT, data)  # after every row: a killed run resumes
    print(render(data))


if __name__ == "__main__":
    main()
