"""reports/bits.md from the bit-allocation benchmark's JSON (see bits.py)."""
from __future__ import annotations

from collections import defaultdict

from mi_opt.evaluate.stats import binomial_interval


def _mark(row: dict, metric: str) -> str:
    """`*` when a paired test finds the change from the unquantized model significant."""
    return "*" if ((row.get("changes") or {}).get(metric) or {}).get("significant") else ""


def _task_score(row: dict, task: str) -> str:
    """Score with its 95% interval (exact: the tasks here are right/wrong per item)."""
    r = row.get("tasks", {}).get(task)
    if not r:
        return "-"
    low, high = r.get("interval") or binomial_interval(round(r["score"] * r["n"]), r["n"])
    return f"{r['score']:.2f} [{low:.2f}, {high:.2f}]{_mark(row, task)}"


def _task_items(p: dict) -> str:
    counts = sorted({t["n"] for r in p["rows"].values() for t in r.get("tasks", {}).values()})
    return "/".join(str(n) for n in counts) or "0"


def _perplexity(row: dict) -> str:
    interval = row.get("perplexity_interval")
    return f"{row['perplexity']:.2f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "") \
        + _mark(row, "perplexity")


def _vs_random(row: dict, metric: str, digits: int) -> str:
    """Paired changes from each random layer half, `*` where significant."""
    changes = [(v or {}).get(metric) for v in (row.get("vs_random_layers") or {}).values()]
    return " / ".join(f"{c['change']:+.{digits}f}{'*' if c['significant'] else ''}" if c else "n/a"
                      for c in changes) or "-"


def _generative(row: dict) -> str:
    if "generative_mean" not in row:
        return "-"
    low, high = row["generative_interval"]
    return f"{row['generative_mean']:.3f} [{low:.3f}, {high:.3f}]{_mark(row, 'generative_mean')}"


def _table(p: dict) -> list[str]:
    tasks = p["tasks"]
    lines = ["| allocation | avg bits | linear MB | perplexity [95%] | increase | vs random layers (ratio) "
             "| paired ppl change vs each random half | generative mean [95%] "
             "| paired generative change vs each random half |" + "".join(f" {t} |" for t in tasks),
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(tasks)]
    for name, r in p["rows"].items():
        vs = "" if r["increase_vs_random"] is None or name.startswith("fp32") else f"{r['increase_vs_random']:.2f}x"
        cells = "".join(f" {_task_score(r, t)} |" for t in tasks)
        lines.append(f"| {name} | {r['avg_bits']:.2f} | {r['linear_bytes'] / 1e6:.2f} | {_perplexity(r)} | "
                     f"{r['ppl_increase']:+.3f} | {vs} | {_vs_random(r, 'perplexity', 2)} | {_generative(r)} | "
                     f"{_vs_random(r, 'generative_mean', 3)} |{cells}")
    return lines


def _module_kind(key: str) -> str:
    return key.split(".", 1)[1] if "." in key else "whole layer"


def _sensitivity_section(granularity: str, s: dict) -> list[str]:
    scores, sizes = s["scores"], s["sizes"]
    ranking = sorted(scores, key=lambda k: -scores[k]["4"]["kl"])
    cal = s["calibration"]
    lines = [f"## Sensitivity per {granularity} (KL when that {granularity} alone is nf4, nats/token)", "",
             f"Measured on {cal['n_samples']} x {cal['seq_len']} tokens of {cal.get('source')} (calibration split), "
             f"{s['cost'].get('runs')} runs in {s['cost'].get('wall_time_s', 0):.0f} s.  ",
             "Most sensitive: " + ", ".join(f"{k} ({scores[k]['4']['kl']:.4f})" for k in ranking[:6]) + ".  ",
             "Least: " + ", ".join(f"{k} ({scores[k]['4']['kl']:.4f})" for k in ranking[-4:]) + ".  ",
             f"Sum over units: nf4 {sum(v['4']['kl'] for v in scores.values()):.4f}, "
             f"int8 {sum(v['8']['kl'] for v in scores.values()):.4f}.", ""]
    if granularity != "module":
        return lines
    by_kind = defaultdict(lambda: {"kl4": 0.0, "kl8": 0.0, "params": 0})
    for key, v in scores.items():
        k = by_kind[_module_kind(key)]
        k["kl4"] += v["4"]["kl"]
        k["kl8"] += v["8"]["kl"]
        k["params"] += sizes[key]["params"]
    lines += ["| module kind | params (all layers) | summed nf4 KL | summed int8 KL | nf4 KL per M params |",
              "|---|---|---|---|---|"]
    for kind, k in sorted(by_kind.items(), key=lambda kv: -kv[1]["kl4"] / kv[1]["params"]):
        lines.append(f"| {kind} | {k['params'] / 1e6:.2f} M | {k['kl4']:.4f} | {k['kl8']:.4f} | "
                     f"{k['kl4'] / (k['params'] / 1e6):.4f} |")
    return lines + [""]


def _chosen_widths(p: dict) -> list[str]:
    lines = ["## What the sensitivity allocations chose", ""]
    for name, r in p["rows"].items():
        if not name.startswith("sensitivity"):
            continue
        bits = r["bits"]
        if "per layer" in name:
            by_width = {w: sorted(int(k[1:]) for k, b in bits.items() if b == w) for w in (8, 16)}
            lines.append(f"- {name}: 8-bit layers {by_width[8]}" + (f", 16-bit {by_width[16]}" if by_width[16] else ""))
            continue
        counts = defaultdict(lambda: defaultdict(int))
        for key, b in bits.items():
            counts[_module_kind(key)][b] += 1
        parts = [f"{kind} " + "/".join(f"{counts[kind][w]}x{w}" for w in (4, 8, 16) if counts[kind][w])
                 for kind in sorted(counts)]
        lines.append(f"- {name} (modules at each width, per kind): " + "; ".join(parts))
    return lines + [""]


def render_markdown(p: dict) -> str:
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in p["sensitivity_vs_random"].items() if v is not None)
    first = next(iter(p["sensitivity"].values()))
    first = {**first, "int8_threshold": first.get("method", {}).get("int8_threshold", 0.0)}
    lines = ["# Bit-width allocation at equal bytes (SmolLM2-135M, bitsandbytes on CPU)", "",
             f"Command: `{p['command']}`  ",
             f"Sensitivity calibration: {first['calibration']['n_samples']} x {first['calibration']['seq_len']} "
             f"tokens of {first['calibration'].get('source')} (calibration split); perplexity: "
             f"{p['args']['eval_samples']} x {p['args']['seq_len']} tokens of {p['args']['eval_source']} "
             "(evaluation split, other text).  ",
             f"Equal-bytes budget for the decoder linears: {p['equal_bytes_budget'] / 1e6:.2f} MB (half the layers "
             f"int8, half {p['args']['quant_type']}; bf16 would be {p['linear_bytes_16bit'] / 1e6:.2f} MB).", "",
             f"**Target** (perplexity increase <= 0.3x the mean of the random layer halves'): {ratios}: "
             f"{'met' if p['target_met'] else 'NOT met'}.", ""]
    lines += _table(p) + [""]
    for granularity, s in p["sensitivity"].items():
        lines += _sensitivity_section(granularity, s)
    lines += _chosen_widths(p)
    lines += ["## Notes", "",
              f"- Timings (s): {p['timings']} on {p['machine']['cpu_count']} visible cores, {p['args']['threads']} "
              "torch threads. Speed is not measured here (bitsandbytes on CPU is not how these models deploy; "
              "benchmarks/deploy.py times deployable files A/B).",
              "- 4-bit on this CPU runs bitsandbytes' fused AVX512-BF16 kernel (bf16 activations); int8 runs "
              f"LLM.int8 with outlier threshold {first.get('int8_threshold', 0.0)} (input columns with a larger "
              "|activation| in fp16, the rest int8 with fp16 activations rounded per row). Sensitivity was measured "
              "with the same real modules.",
              "- Bytes are the decoder linears only (weights + scales); embeddings and the tied lm_head stay full "
              "precision in every row.",
              "- Sensitivity allocations use `allocate_bits` (the bits planner's knapsack) under `max_bytes` = the "
              "budget. Random modules: modules in a random order, each raised to 8 bits while the bytes fit.",
              "- The reference row is the unquantized model (run in fp32); its linear MB is the bf16 size.",
              ("- Tasks: " + ", ".join(p["tasks"]) + f" (mi_opt.evaluate), {_task_items(p)} items each; [low, "
               "high] is the exact 95% (Clopper-Pearson) interval, the generative mean's a normal one from the "
               "tasks'. `*` marks a change from the unquantized model that a paired test finds significant at 95% "
               "(McNemar on the same items; a paired bootstrap over the same perplexity windows; for the "
               "generative mean, a normal test from the tasks' paired changes). The 'vs each random half' columns "
               "are the same paired tests against each random layer half (seeds in order)."
               if p["tasks"] else "- Generative tasks were not run in this report (`--tasks ''`)."), ""]
    return "\n".join(lines)
