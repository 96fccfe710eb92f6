"""Speed where users deploy: prefill and decode of GGUF files in llama.cpp, A/B interleaved.

A skeleton for issue 16, part 3. It times any .gguf files given (the bundle's own Q4_1, mi-opt
exports from `mi-opt apply ... --format gguf`) through llama.cpp's Python binding, round-robin:
every repetition runs each file once in turn, so a drift in the shared machine's load hits all
of them alike, with the same threads, prompt and token counts. Reports medians and the spread
(min..max) of prefill tokens/s and decode tokens/s.

It needs `llama-cpp-python`, which PyPI ships as source: `pip install llama-cpp-python`
compiles llama.cpp (7.6 minutes on this project's 2-core machine, measured in issue 16), so
neither CI nor the test suite depends on it. Not yet here: the transformers + torchao rows and
the rendering into reports/deploy.md.

    python benchmarks/deploy.py A.gguf B.gguf --threads 2 --repetitions 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

PROMPT = ("The Debian Administrator's Handbook explains how packages are installed, upgraded and removed, "
          "how services are configured, and how a system is kept secure over the years. ")


def _llama(path: Path, threads: int, n_ctx: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("benchmarks/deploy.py needs llama-cpp-python: pip install llama-cpp-python "
                 "(compiles llama.cpp from source: minutes of every core)")
    return Llama(model_path=str(path), n_threads=threads, n_ctx=n_ctx, verbose=False)


def time_once(llm, prompt_tokens: list[int], new_tokens: int) -> dict:
    """Prefill of the prompt and greedy decode of new_tokens, timed separately (seconds)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt_tokens)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = llm.sample(temp=0.0)
        llm.eval([token])
    decode = time.perf_counter() - start
    return {"prefill_tok_s": len(prompt_tokens) / prefill, "decode_tok_s": new_tokens / decode}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path, help=".gguf files to compare")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=85)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--json", type=Path, help="write the medians and spreads here")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        sys.exit(f"no such file: {', '.join(missing)}")
    models = {f.name if list(args.files).count(f) == 1 else str(f): _llama(f, args.threads, 512) for f in args.files}
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for name, llm in models.items():  # burn-in: first calls page the weights in and warm the caches
        tokens = llm.tokenize(PROMPT.encode() * 4)[:args.prompt_tokens]
        time_once(llm, tokens, 4)
    for _ in tqdm(range(args.repetitions), desc="repetitions"):
        for name, llm in models.items():  # interleaved: A, B, ..., A, B, ...
            tokens = llm.tokenize(PROMPT.encode() * 4)[:args.prompt_tokens]
            runs[name].append(time_once(llm, tokens, args.new_tokens))
    summary = {}
    for name, rows in runs.items():
        summary[name] = {k: {"median": statistics.median(r[k] for r in rows), "min": min(r[k] for r in rows),
                             "max": max(r[k] for r in rows)} for k in ("prefill_tok_s", "decode_tok_s")}
        s = summary[name]
        print(f"{name}: prefill {s['prefill_tok_s']['median']:.1f} tok/s "
              f"({s['prefill_tok_s']['min']:.1f}..{s['prefill_tok_s']['max']:.1f}), decode "
              f"{s['decode_tok_s']['median']:.1f} tok/s ({s['decode_tok_s']['min']:.1f}..{s['decode_tok_s']['max']:.1f})")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "prompt_tokens": args.prompt_tokens,
                                         "new_tokens": args.new_tokens, "repetitions": args.repetitions,
                                         "results": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
