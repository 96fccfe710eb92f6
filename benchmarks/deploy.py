"""Speed where users deploy: SmolLM2 exports run in llama.cpp, against transformers on the same cores.

    python benchmarks/deploy.py            # build the files, measure perplexity, time them (resumable)
    python benchmarks/deploy.py --build    # only build the files and measure their perplexity
    python benchmarks/deploy.py --speed    # only the timing pass (the files must exist)
    python benchmarks/deploy.py --render   # only rebuild reports/deploy.md

Three kinds of GGUF file, all for the same bundled model:
- mi-opt exports (`export(..., format="gguf")`, what `mi-opt apply ... --format gguf` writes):
  F16, the bits-4-8-mix plan, the bit planner's allocation at the bytes of llama.cpp's mixes, GPTQ
  (`--gguf-quantizer gptq`) against round-to-nearest at equal types, the quickstart's layer plan;
- llama.cpp's own quantizer (`llama_model_quantize`, what its `llama-quantize` tool runs) applied to
  mi-opt's F16 file: uniform Q8_0 and Q4_0, and its hand-tuned mixes Q4_K_M and Q5_K_M;
- the bundle's own Q4_1 file, as shipped.
Every file's perplexity is measured as transformers reads it (`gguf_file=`, dequantized) on the
recipes' evaluation windows (handbook + KJV, 16 x 256 tokens). Then one timing pass runs every file
in llama.cpp and the original (and the quickstart structure, and torchao int8) in transformers, in
interleaved rounds in one process, the same prompt ids, the same threads; a calibration kernel
before and after says in words when the machine was busy.

Needs `llama-cpp-python`, which PyPI ships as source: `pip install llama-cpp-python` compiles
llama.cpp (5.4 minutes of both cores here), so neither CI nor the tests depend on it. The files
(about 1.5 GB) go to --work (default ~/.cache/mi-opt/deploy), the figures to reports/deploy.json.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mi_opt.artifacts import machine, versions, write_json
from mi_opt.evaluate.ab_speed import Reliability, load_average, machine_warnings, spread_notes, timed_rounds
from mi_opt.evaluate.perplexity import perplexity
from mi_opt.evaluate.speed import forward_kwargs, median_spread, timed_generation
from mi_opt.export import export
from mi_opt.formats.gguf import apply_structure_, source_gguf
from mi_opt.formats.gguf_types import GgufOptions
from mi_opt.models import load_model
from mi_opt.plan import CompressionPlan
from mi_opt.surgery import apply_

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "reports" / "deploy.json"
SPEC = "smollm2-135m"
N_LAYERS = 30
MIX = ROOT / "reports" / "recipes" / "bits-4-8-mix" / "plan.json"
QUICKSTART = ROOT / "reports" / "recipes" / "default" / "plan.json"
PROMPT_TOKENS, NEW_TOKENS = 128, 64


@dataclass(frozen=True)
class FileRow:
    """One GGUF file: made by mi-opt (bits, structure, gguf options), by llama.cpp's quantizer
    from mi-opt's F16 file (ftype), or the bundle's own file."""

    maker: str                     # "mi-opt" | "llama.cpp" | "bundle"
    bits: str = ""                 # "", "mix" or "Q8_0-embed" (see plan_bits)
    structure: Path | None = None  # a plan whose layers/heads/neurons are removed first
    gguf: dict = field(default_factory=dict)
    ftype: str = ""                # llama.cpp LLAMA_FTYPE_MOSTLY_<ftype>


FILES = {
    "F16 (mi-opt export)": FileRow("mi-opt"),
    "Q8_0 (llama.cpp quantizer)": FileRow("llama.cpp", ftype="Q8_0"),
    "Q4_0 (llama.cpp quantizer)": FileRow("llama.cpp", ftype="Q4_0"),
    "Q4_K_M (llama.cpp quantizer)": FileRow("llama.cpp", ftype="Q4_K_M"),
    "Q5_K_M (llama.cpp quantizer)": FileRow("llama.cpp", ftype="Q5_K_M"),
    "Q4_1 (the bundle's own file)": FileRow("bundle"),
    "bits-4-8-mix, Q4_0/Q8_0, Q8_0 embedding (mi-opt)": FileRow("mi-opt", "mix"),
    "bits-4-8-mix, Q4_1/Q8_0, Q8_0 embedding (mi-opt)": FileRow("mi-opt", "mix", gguf={"types": {4: "Q4_1"}}),
    # mi-opt's bit planner at a llama.cpp mix's bytes, from the same menu of types llama.cpp's mixes take
    # for rows of 576 (Q4_0 / Q5_0 / Q8_0 per module, no Q4_1: that would ride the bundle's 4-bit grid).
    "measured Q4_0/Q5_0/Q8_0 at Q4_K_M's bytes (mi-opt)": FileRow("mi-opt", "measured:Q4_K_M (llama.cpp quantizer)"),
    "measured Q4_0/Q5_0/Q8_0 at Q5_K_M's bytes (mi-opt)": FileRow("mi-opt", "measured:Q5_K_M (llama.cpp quantizer)"),
    # GPTQ (export.gguf.quantizer gptq): the same types, each Q4_0 / Q5_0 block error-compensated.
    "Q4_0 linears, Q8_0 embedding, GPTQ (mi-opt)": FileRow("mi-opt", "uniform-4", gguf={"quantizer": "gptq"}),
    "measured Q4_0/Q5_0/Q8_0 at Q4_K_M's bytes, GPTQ (mi-opt)":
        FileRow("mi-opt", "measured:Q4_K_M (llama.cpp quantizer)", gguf={"quantizer": "gptq"}),
    "quickstart plan (4 layers dropped), F16 (mi-opt)": FileRow("mi-opt", structure=QUICKSTART),
    "quickstart plan, Q4_1 linears, Q8_0 embedding (mi-opt)":
        FileRow("mi-opt", "uniform-4", structure=QUICKSTART, gguf={"types": {4: "Q4_1"}}),
}
# Transformers rows of the timing pass: name -> (structure plan or None, plan bits, backend).
TRANSFORMERS = {
    "original, transformers fp32": (None, "", "bitsandbytes"),
    "quickstart plan, transformers fp32": (QUICKSTART, "", "bitsandbytes"),
    "original, transformers + torchao int8 weight-only": (None, "uniform-8", "torchao"),
}


def plan_bits(kind: str, measured: dict | None = None) -> dict:
    if kind.startswith("measured:"):
        return {**measured, "embed": 8, "lm_head": 8}  # Q8_0 embedding, as llama.cpp's mixes give it here
    if kind == "mix":
        return {**CompressionPlan.load(MIX).bits, "embed": 8, "lm_head": 8}
    if kind.startswith("uniform-"):
        width = int(kind.split("-")[1])
        return {**{f"L{i}": width for i in range(N_LAYERS)}, **({"embed": 8, "lm_head": 8} if width < 8 else {})}
    return {}


def structure_of(path: Path | None) -> dict:
    if path is None:
        return {}
    p = CompressionPlan.load(path)
    return {"drop_layers": p.drop_layers, "prune_heads": p.prune_heads, "head_mode": p.head_mode,
            "prune_neurons": p.prune_neurons, "neuron_mode": p.neuron_mode}


def make_plan(row_bits: str, structure: Path | None, backend: str = "gguf", measured: dict | None = None,
              quant_type: str | None = None) -> CompressionPlan:
    """quant_type: the 4-bit GGML type the file writes (gguf backend; None: Q4_0)."""
    return CompressionPlan(model={"n_layers": N_LAYERS, "spec": SPEC}, bits=plan_bits(row_bits, measured),
                           backend=backend, quant_type="nf4" if backend == "bitsandbytes" else quant_type,
                           **structure_of(structure))


def llama_quantize(source: Path, target: Path, ftype: str) -> None:
    """llama.cpp's own quantizer, as its llama-quantize tool runs it (no importance matrix)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = os.cpu_count() or 1
    partial = target.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {source} -> {ftype} failed")
    partial.rename(target)


def linear_bytes(path: Path) -> int:
    """Bytes a GGUF file spends on its decoder blocks' matrices (blk.*, 2-D)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if t.name.startswith("blk.") and len(t.shape) > 1)


def measured_bits(original, tokenizer, budget: int, work: Path) -> dict:
    """The bit planner's allocation (gguf backend: damage of each module measured with the Q4_0, Q5_0
    and Q8_0 quantizers themselves, KL on calibration windows) within `budget` bytes of decoder matrices."""
    from mi_opt.data import token_windows
    from mi_opt.policy.bits import BitsConfig, allocate_bits
    from mi_opt.profile.quant_sensitivity import QuantSensitivity, measure_quant_sensitivity

    path = work / "sensitivity-gguf-module.json"
    if path.exists():
        sens = QuantSensitivity.load(path)
    else:
        windows = token_windows(tokenizer, "handbook", 4, 128, split="calibration")  # 630 replays: keep them short
        sens = measure_quant_sensitivity(original, windows, widths=(4, 5, 8), granularity="module",
                                         quant_type="Q4_0", backend="gguf", model_spec=SPEC,
                                         calibration={"source": "handbook", "split": "calibration"})
        sens.save(path)
    damage = {k: {int(w): v["kl"] for w, v in per.items()} for k, per in sens.scores.items()}
    bits, _ = allocate_bits(damage, sens.sizes, BitsConfig(max_bytes=budget, widths=(4, 5, 8, 16), backend="gguf",
                                                           quant_type="Q4_0"))
    return bits


def build_file(name: str, row: FileRow, work: Path, original, tokenizer, data: dict) -> Path:
    """The row's .gguf under work/, made if missing (mi-opt exports verify themselves by a reload)."""
    target = work / (name.split(" (")[0].replace(" ", "_").replace(",", "").replace("/", "-") + ".gguf")
    if row.maker == "bundle":
        return source_gguf(SPEC)
    # Always made anew: a row is built only when reports/deploy.json lacks it, and a file left by an
    # earlier run may come from other code (a GPTQ file from before a fix was once measured again).
    if row.maker == "llama.cpp":
        llama_quantize(Path(data["files"]["F16 (mi-opt export)"]["path"]), target, row.ftype)
        return target
    measured = None
    if row.bits.startswith("measured:"):
        measured = measured_bits(original, tokenizer, linear_bytes(Path(data["files"][row.bits[9:]]["path"])), work)
    plan = make_plan(row.bits, row.structure, measured=measured, quant_type=row.gguf.get("types", {}).get(4))
    plan.save(ROOT / "reports" / "deploy" / f"{target.stem}.plan.json")
    model = apply_structure_(copy.deepcopy(original), plan)
    folder = export(model, tokenizer, plan, work / f"{target.stem}.export", format="gguf",
                    gguf=GgufOptions(**row.gguf), force=True)
    shutil.move(folder / "model.gguf", target)
    shutil.rmtree(folder)
    return target


def tensor_types(path: Path) -> dict[str, int]:
    """How many 2-D tensors the file holds of each GGML type."""
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors if len(t.shape) > 1))


def quality(model, tokenizer) -> dict:
    """Perplexity on the evaluation windows, with the per-window sums that pair it with any other row."""
    result = perplexity(model, tokenizer, "handbook+kjv", 16, 256, 4, 0, progress=False)
    return {"perplexity": round(result["perplexity"], 3),
            "windows": {k: result[k] for k in ("window_nll_sum", "window_tokens", "windows_hash")}}


def file_quality(path: Path, tokenizer) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return quality(model, tokenizer)


def fill_windows(data: dict, original, tokenizer) -> None:
    """Per-window results for rows measured before they were kept (deploy.json from before #14's
    paired tests): each row is measured again on the same windows, its perplexity replaced by the new one."""
    if "original_windows" not in data:
        q = quality(original, tokenizer)
        data["original_perplexity"], data["original_windows"] = q["perplexity"], q["windows"]
        write_json(OUT, data)
    for name, f in data["files"].items():
        if "windows" not in f and Path(f["path"]).exists():
            print(f"per-window perplexity: {name}", flush=True)
            f.update(file_quality(Path(f["path"]), tokenizer))
            write_json(OUT, data)
    for name, t in data.get("transformers", {}).items():
        if "windows" not in t:
            print(f"per-window perplexity: {name}", flush=True)
            t.update(quality(transformers_model(name, original), tokenizer))
            write_json(OUT, data)


def llama_runner(path: Path, threads: int, ids: list[int]):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)

    def run() -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            llm.eval([llm.sample(temp=0.0)])
        return prefill, time.perf_counter() - start
    return run


def transformers_runner(model, ids: list[int]):
    tensor, extra = torch.tensor([ids]), forward_kwargs(model)

    def run() -> tuple[float, float]:
        with torch.inference_mode():
            prefill, _, decode = timed_generation(model, tensor, NEW_TOKENS, extra)
        return prefill, decode
    return run


def transformers_model(name: str, original):
    structure, bits, backend = TRANSFORMERS[name]
    return apply_(copy.deepcopy(original), make_plan(bits, structure, backend)) if structure or bits else original


def speed_pass(data: dict, original, tokenizer, threads: int, rounds: int) -> dict:
    # One prompt for every runtime: the same token ids (llama.cpp and transformers share the vocabulary).
    ids = tokenizer((ROOT / "README.md").read_text())["input_ids"][:PROMPT_TOKENS]
    runners = {name: llama_runner(Path(data["files"][name]["path"]), threads, ids) for name in FILES}
    for name in TRANSFORMERS:
        runners[name] = transformers_runner(transformers_model(name, original), ids)
    timed = timed_rounds(runners, rounds, warmup=1, progress=True)
    runs, order, before, after = timed.runs, timed.order, timed.kernel_before, timed.kernel_after
    load = load_average()
    rows = {}
    for name, timings in runs.items():
        prefill, decode = zip(*timings)
        rows[name] = {"prefill_tok_s": median_spread([PROMPT_TOKENS / t for t in prefill]),
                      "decode_tok_s": median_spread([(NEW_TOKENS - 1) / t for t in decode])}
    base = "original, transformers fp32"
    unsteady = {}
    for name, timings in runs.items():  # per-round ratios against transformers fp32 in the same round
        rows[name]["decode_vs_transformers"] = median_spread([b[1] / t[1] for b, t in zip(runs[base], timings)])
        rows[name]["prefill_vs_transformers"] = median_spread([b[0] / t[0] for b, t in zip(runs[base], timings)])
        for part in ("decode", "prefill"):
            r = rows[name][f"{part}_vs_transformers"]
            spread = (r["q3"] - r["q1"]) / r["median"]
            if spread > Reliability().spread_limit:
                unsteady.setdefault(name, {})[part] = f"{name}'s {part} speedup varies by {spread:.0%} across rounds"
    parts = {n: {"prefill": [t[0] for t in r], "decode": [t[1] for t in r]} for n, r in runs.items()}
    # The A/B rule (mi_opt.evaluate.ab_speed.ab_result): the machine's checks hold for every row; a
    # speedup whose per-round ratios vary is flagged on its own row; raw times varying across rounds,
    # which the same-round baseline cancels where the whole machine moved, are only noted.
    warnings = machine_warnings(before, after, load, cpu=timed.cpu)
    return {"threads": threads, "rounds": rounds, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
            "rows": rows, "runs": {n: [list(t) for t in r] for n, r in runs.items()}, "order": order,
            "kernel_before": before, "kernel_after": after, "load": load,
            "cpu_shares": asdict(timed.cpu) if timed.cpu else None, "warnings": warnings, "reliable": not warnings,
            "unsteady": unsteady, "spread_notes": spread_notes(parts)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "mi-opt" / "deploy",
                   help="where the .gguf files are made (about 1.5 GB)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    only = p.add_mutually_exclusive_group()
    only.add_argument("--speed", action="store_true", help="only the timing pass")
    only.add_argument("--build", action="store_true",
                      help="only build the files and measure their perplexity: time them later, on an idle machine")
    only.add_argument("--render", action="store_true", help="only rebuild reports/deploy.md")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from deploy_render import render

    args = parse_args(argv)
    data = json.loads(OUT.read_text()) if OUT.exists() else {"files": {}}
    if args.render:
        print(render(data))
        return 0
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/deploy.py needs llama-cpp-python: pip install llama-cpp-python "
                 "(compiles llama.cpp from source: minutes of every core)")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    original, tokenizer = load_model(SPEC)
    if not args.speed:
        fill_windows(data, original, tokenizer)
    # A file listed in deploy.json but gone from --work (a fresh machine, a cleared cache) is rebuilt:
    # its figures are remade with it, so the timing pass never runs a file other than the one measured.
    missing = [n for n, f in data["files"].items() if n in FILES and not Path(f["path"]).exists()]
    absent = missing + sorted(set(FILES) - set(data["files"]))
    if args.speed and absent:
        sys.exit(f"--speed needs every file built; missing: {', '.join(absent)}. "
                 "Run without --speed to build them (resumable).")
    for name, row in FILES.items():
        if args.speed or (name in data["files"] and name not in missing):
            continue
        print(f"file {name}", flush=True)
        started = time.perf_counter()
        path = build_file(name, row, args.work, original, tokenizer, data)
        built_s = time.perf_counter() - started
        data["files"][name] = {"path": str(path), "maker": row.maker, "file_mb": round(path.stat().st_size / 1e6, 1),
                               "types": tensor_types(path), "build_s": round(built_s, 1),
                               **file_quality(path, tokenizer)}
        data.update(machine=machine(), versions={**versions(), "llama_cpp_python": llama_cpp.__version__})
        write_json(OUT, data)  # after every file: a killed run resumes
    for name in TRANSFORMERS:
        if not args.speed and name not in data.setdefault("transformers", {}):
            print(f"transformers {name}", flush=True)
            model = transformers_model(name, original)
            data["transformers"][name] = quality(model, tokenizer)
            write_json(OUT, data)
    if args.build:
        print("files built; time them with --speed on an idle machine")
        return 0
    data["speed"] = speed_pass(data, original, tokenizer, args.threads, args.rounds)
    write_json(OUT, data)
    print(render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
