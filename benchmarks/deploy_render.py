"""reports/deploy.md from reports/deploy.json (benchmarks/deploy.py)."""
from __future__ import annotations

from pathlib import Path

from mi_opt.evaluate.speed import median_spread
from mi_opt.evaluate.paired import change_text, perplexity_change

ROOT = Path(__file__).resolve().parent.parent
BASE = "original, transformers fp32"


def _ratio(speed: dict, name: str, base: str, part: int = 1) -> dict | None:
    """Per-round speedup of `name` over `base` (decode: part 1, prefill: part 0), same rounds."""
    runs = speed.get("runs", {})
    if name not in runs or base not in runs:
        return None
    return median_spread([b[part] / t[part] for b, t in zip(runs[base], runs[name])])


def _fmt_ratio(r: dict | None) -> str:
    return "-" if r is None else f"{r['median']:.2f}x [{r['q1']:.2f}, {r['q3']:.2f}]"


def _fmt_rate(row: dict | None, key: str) -> str:
    if not row:
        return "-"
    s = row[key]
    return f"{s['median']:.1f} [{s['q1']:.1f}, {s['q3']:.1f}]"


def _paired(base: dict, other: dict) -> dict | None:
    """Perplexity change from base to other, paired over the same evaluation windows (None when a row
    was measured before per-window results were kept)."""
    change = perplexity_change(base.get("windows"), other.get("windows"))
    return None if "reason" in change else change


def _fmt_change(change: dict | None) -> str:
    """+1.401 [1.102, 1.735]* : the change, its 95% interval, * when the paired test finds it."""
    return change_text(change, 3) or "(no per-window results: not tested)"


def _types(types: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(types.items(), key=lambda kv: -kv[1]))


def _speed_lines(speed: dict) -> list[str]:
    if not speed:
        return ["Not timed yet: run `python benchmarks/deploy.py --speed`.", ""]
    lines = [f"Timing: {speed['rounds']} interleaved rounds (the order rotated each round) after one warm-up run "
             f"each, {speed['threads']} threads in llama.cpp and in torch, one prompt of {speed['prompt_tokens']} "
             f"token ids for every runtime, then {speed['new_tokens']} greedy tokens. Rates are tokens/s, median "
             "[interquartile range]; a speedup is the median of per-round ratios against transformers fp32 "
             "in the same round."]
    if speed["warnings"]:
        lines += ["", "**Timing unreliable:** " + "; ".join(speed["warnings"]) + ". Rerun on an idle machine "
                  "before trusting the speed columns."]
    unsteady = [sentence for parts in speed.get("unsteady", {}).values() for sentence in parts.values()]
    if unsteady:
        lines += ["", "Unsteady speedups (interquartile range of the per-round ratios over 15% of their median; "
                  "marked ~ in the table, read them loosely): " + "; ".join(unsteady) + "."]
    if speed.get("spread_notes"):
        lines += ["", "Raw times that varied across rounds (the same-round ratios cancel what moved every row "
                  "alike): " + "; ".join(speed["spread_notes"]) + "."]
    return lines + [""]


def _fmt_speedup(speed: dict, name: str) -> str:
    """Decode speedup over transformers fp32, ~ when its per-round ratios are unsteady."""
    text = _fmt_ratio(_ratio(speed, name, BASE))
    return text + (" ~" if "decode" in speed.get("unsteady", {}).get(name, {}) else "")


def _original(data: dict) -> dict:
    return {"perplexity": data["original_perplexity"], "windows": data.get("original_windows")}


def _verdict(change: dict | None, lower: str, higher: str) -> str:
    """What a paired difference (other - base) says: only a significant one names a winner."""
    if change is None:
        return "not tested (no per-window results)"
    if not change["significant"]:
        return "no significant difference over these windows"
    return lower if change["change"] < 0 else higher


def _targets(data: dict) -> list[str]:
    files, speed = data["files"], data.get("speed", {})
    original = _original(data)
    base = original["perplexity"]
    out = []
    r = _ratio(speed, "quickstart plan, Q4_1 linears, Q8_0 embedding (mi-opt)", "quickstart plan, transformers fp32")
    if r:
        out.append(f"- **Deploy speed.** The quickstart-sized model (4 layers dropped) exported for llama.cpp (Q4_1 "
                   f"linears, Q8_0 embedding) decodes **{r['median']:.2f}x** [{r['q1']:.2f}, {r['q3']:.2f}] as fast as "
                   "the same model in transformers fp32 on the same cores (target: at least 3x).")
    ao = data.get("transformers", {}).get("original, transformers + torchao int8 weight-only")
    if ao:
        out.append(f"- **Weight-only int8** (torchao, every decoder linear): perplexity {_fmt_change(_paired(original, ao))} "
                   "(target: at most +0.1).")
    q40 = files.get("Q4_0 (llama.cpp quantizer)")
    if q40:
        out.append(f"- **At uniform Q4_0's bytes** ({q40['file_mb']} MB, {q40['perplexity'] - base:+.3f}): on this model "
                   "every matrix has rows of 576 or 1536 values, and no type below Q4_0 splits rows of 576 without "
                   "K-quant super-blocks of 256 (llama.cpp itself falls back to Q5_0 / IQ4_NL there), so an "
                   "allocation cannot spend fewer bytes anywhere to buy bits elsewhere: not reachable with the "
                   "types the gguf package writes. The nearest comparisons are the rows below.")
    for k in ("Q4_K_M", "Q5_K_M"):
        rival = files.get(f"{k} (llama.cpp quantizer)")
        mine = files.get(f"measured Q4_0/Q5_0/Q8_0 at {k}'s bytes (mi-opt)")
        if not rival or not mine:
            continue
        rel = (mine["perplexity"] - base) / (rival["perplexity"] - base)
        d = _ratio(speed, f"measured Q4_0/Q5_0/Q8_0 at {k}'s bytes (mi-opt)", f"{k} (llama.cpp quantizer)")
        diff = _paired(rival, mine)
        out.append(f"- **Against llama.cpp's {k}** ({rival['file_mb']} MB, {rival['perplexity'] - base:+.3f}): mi-opt's "
                   f"allocation at its decoder bytes ({mine['file_mb']} MB) raises perplexity by "
                   f"{mine['perplexity'] - base:+.3f} (**{rel:.2f}x**); paired difference {_fmt_change(diff)}: "
                   + _verdict(diff, "mi-opt's measured allocation is better", f"**{k} is better**")
                   + (f"; it decodes at {d['median']:.2f}x {k}'s rate in llama.cpp" if d else "") + ".")
    gptq = files.get("Q4_0 linears, Q8_0 embedding, GPTQ (mi-opt)")
    if q40 and gptq:
        diff = _paired(q40, gptq)
        out.append(f"- **GPTQ against round-to-nearest**, the same Q4_0 types and bytes ({gptq['file_mb']} MB): "
                   f"{gptq['perplexity'] - base:+.3f} against llama.cpp's {q40['perplexity'] - base:+.3f} "
                   f"({(gptq['perplexity'] - base) / (q40['perplexity'] - base):.2f}x the increase); paired difference "
                   f"{_fmt_change(diff)}: " + _verdict(diff, "GPTQ is better", "round-to-nearest is better") + ".")
    mine = files.get("measured Q4_0/Q5_0/Q8_0 at Q4_K_M's bytes, GPTQ (mi-opt)")
    rival = files.get("Q4_K_M (llama.cpp quantizer)")
    if mine and rival:
        diff = _paired(rival, mine)
        out.append(f"- **Measured allocation + GPTQ against Q4_K_M** ({mine['file_mb']} vs {rival['file_mb']} MB): "
                   f"{mine['perplexity'] - base:+.3f} against {rival['perplexity'] - base:+.3f} "
                   f"({(mine['perplexity'] - base) / (rival['perplexity'] - base):.2f}x); paired difference "
                   f"{_fmt_change(diff)}: " + _verdict(diff, "the allocation + GPTQ is better", "Q4_K_M is better")
                   + ". The allocation was measured with round-to-nearest quantizers, so GPTQ here is applied to a "
                   "plan it did not choose.")
    rtn = files.get("measured Q4_0/Q5_0/Q8_0 at Q4_K_M's bytes (mi-opt)")
    if mine and rtn:
        diff = _paired(rtn, mine)
        out.append(f"- **GPTQ on the measured allocation** (the same types): paired difference against round-to-nearest "
                   f"{_fmt_change(diff)}: " + _verdict(diff, "GPTQ is better", "round-to-nearest is better") + ".")
    mix = files.get("bits-4-8-mix, Q4_0/Q8_0, Q8_0 embedding (mi-opt)")
    if q40 and mix:
        d = _ratio(speed, "bits-4-8-mix, Q4_0/Q8_0, Q8_0 embedding (mi-opt)", "Q4_0 (llama.cpp quantizer)")
        out.append(f"- The older bits-4-8-mix plan (damage measured with bitsandbytes, not the GGML quantizers) at "
                   f"{mix['file_mb']} MB: {mix['perplexity'] - base:+.3f}, "
                   f"{(mix['perplexity'] - base) / (q40['perplexity'] - base):.2f}x uniform Q4_0's increase"
                   + (f", decoding at {d['median']:.2f}x its rate" if d else "") + ".")
    return out


def render(data: dict) -> Path:
    original = _original(data)
    speed = data.get("speed", {})
    rows = speed.get("rows", {})
    lines = ["# Where users deploy: SmolLM2-135M in llama.cpp and in transformers", "",
             "Made by `python benchmarks/deploy.py` (resumable; `--render` rebuilds this page). Perplexity of each "
             "GGUF file as transformers reads it (`gguf_file=`, dequantized), on 16 x 256 evaluation windows of "
             f"handbook + KJV; the original (fp32 in transformers): {original['perplexity']:.3f}. In brackets: each "
             "row's change from the original with its 95% interval, from a paired bootstrap over the 16 windows; "
             "* marks a change that paired test finds. llama.cpp's files are made by its own "
             "quantizer (`llama_model_quantize`, what `llama-quantize` runs, no importance matrix) from mi-opt's F16 "
             "export. The bundled model was shipped as Q4_1, so its weights already lie on a 4-bit grid: Q4_1 costs "
             "it nothing, and any comparison at 4-5 bits carries that caveat.", ""]
    lines += _speed_lines(speed)
    lines += ["| file | made by | size | tensor types (2-D) | perplexity | decode tok/s | prefill tok/s | "
              "decode vs transformers fp32 |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for name, f in data["files"].items():
        lines.append(f"| {name} | {f['maker']} | {f['file_mb']} MB | {_types(f['types'])} | {f['perplexity']:.3f} "
                     f"({_fmt_change(_paired(original, f))}) | {_fmt_rate(rows.get(name), 'decode_tok_s')} | "
                     f"{_fmt_rate(rows.get(name), 'prefill_tok_s')} | {_fmt_speedup(speed, name)} |")
    for name, t in data.get("transformers", {}).items():
        lines.append(f"| {name} | transformers | - | - | {t['perplexity']:.3f} ({_fmt_change(_paired(original, t))}) | "
                     f"{_fmt_rate(rows.get(name), 'decode_tok_s')} | {_fmt_rate(rows.get(name), 'prefill_tok_s')} | "
                     f"{_fmt_speedup(speed, name)} |")
    lines += ["", "## Against the targets (issue 16)", ""] + _targets(data)
    lines += ["", "## Running an mi-opt export in llama.cpp", "",
              "```bash", "mi-opt apply smollm2-135m reports/recipes/bits-4-8-mix/plan.json --format gguf --gguf-4bit Q4_1 "
              "--out out/gguf", "pip install llama-cpp-python   # compiles llama.cpp: minutes",
              "python -c \"from llama_cpp import Llama; m = Llama('out/gguf/model.gguf', n_threads=2); "
              "print(m('The capital of France is', max_tokens=16)['choices'][0]['text'])\"",
              "```", "", "Any llama.cpp build runs the same file (`llama-cli -m out/gguf/model.gguf`).", ""]
    path = ROOT / "reports" / "deploy.md"
    path.write_text("\n".join(lines))
    return path
