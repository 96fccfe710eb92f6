"""reports/scorers.md and its plots, from the scorer benchmark's JSON (see scorers.py).

Each score is shown with its 95% interval; `*` marks a change from the original that a paired
test on the same items (McNemar) or windows (bootstrap) finds significant. A second table per
kind gives each plan's paired change from the reference method's plan at the same budget. Data
from before version 2 of scorers.json holds none of these, and is shown without them.
"""
from __future__ import annotations

import math
from pathlib import Path

from mi_opt.evaluate.paired import change_text

SHORT = {"miopt_facts_mc": "facts MC", "miopt_arithmetic": "arith", "miopt_capitals": "capitals",
         "miopt_name_lookup": "lookup", "miopt_sequences": "sequences"}


PAIRED_NOTE = ("Intervals are 95%; `*` marks a change from the original that a paired test on the same items "
               "(McNemar) or windows (bootstrap; for the generative mean, a normal test from the tasks' paired "
               "changes) finds significant at 95%.")
UNPAIRED_NOTE = "This data predates per-item results (scorers.json version 1): no intervals, no significance."


def _tasks(data: dict) -> list[tuple[str, str]]:
    """(task, column label) for every task the original was evaluated on, in a fixed order."""
    measured = data["evals"]["original"]["tasks"]
    return [(t, SHORT.get(t, t)) for t in [*SHORT, *sorted(set(measured) - set(SHORT))] if t in measured]


def _mark(ev: dict, metric: str) -> str:
    return "*" if (ev.get("changes") or {}).get(metric, {}) and ev["changes"][metric].get("significant") else ""


def _interval(ev: dict, key: str, digits: int) -> str:
    lo_hi = ev.get(key)
    # round first, then add 0.0: a bound of -0.001 reads 0.00, not -0.00
    return f" [{round(lo_hi[0], digits) + 0.0:.{digits}f}, {round(lo_hi[1], digits) + 0.0:.{digits}f}]" if lo_hi else ""


def _items_judged(evaluation: dict) -> str:
    limit = evaluation.get("task_limit")
    return "every item" if limit is None else f"the first {limit} items of each"


def _key(kind: str, plan: dict) -> str:
    return f"{kind}:{sorted(plan.items())}"


def rows(data: dict, kind: str) -> list[dict]:
    """One row per (method, budget) of one kind (layers and sublayers together)."""
    bi = data["profiles"].get("block_influence[layer]")
    out = []
    for name, m in data["methods"].items():
        if (m["kind"] == "heads") != (kind == "heads"):
            continue
        for budget, b in m["budgets"].items():
            ev = data["evals"].get(_key(m["kind"], b["plan"]))
            if ev is None:
                continue
            ratio = (b["cost"]["wall_s"] / bi["wall_s"]) if bi and bi["wall_s"] else None
            out.append({"method": name.removeprefix("heads/"), "budget": budget, "eval": ev, "cost": b["cost"], "bi_ratio": ratio})
    return out


def _table(data: dict, kind: str) -> list[str]:
    base, tasks = data["evals"]["original"], _tasks(data)
    budget_head = "layers dropped" if kind == "layers" else "heads pruned"
    lines = [f"| {budget_head} | method | perplexity | ppl increase | " + " | ".join(t for _, t in tasks)
             + " | generative mean | wall s | fwd-equiv | x BI wall |",
             "|" + "---|" * (8 + len(tasks))]
    for r in sorted(rows(data, kind), key=lambda r: (float(r["budget"]), r["eval"]["perplexity"])):
        ev = r["eval"]
        scores = " | ".join(f"{ev['tasks'][t]:.2f}{_mark(ev, t)}" if t in ev["tasks"] else "" for t, _ in tasks)
        ratio = f"{r['bi_ratio']:.1f}" if r["bi_ratio"] is not None else ""
        budget = r["budget"] if kind == "layers" else f"{float(r['budget']):.0%}"
        lines.append(f"| {budget} | {r['method']} | {ev['perplexity']:.1f}{_interval(ev, 'perplexity_interval', 1)}"
                     f"{_mark(ev, 'perplexity')} | {ev['perplexity'] - base['perplexity']:+.1f} | {scores} | "
                     f"{ev['generative_mean']:.2f}{_interval(ev, 'generative_interval', 2)}"
                     f"{_mark(ev, 'generative_mean')} | "
                     f"{r['cost']['wall_s']:.1f} | {r['cost']['forward_equivalents']:.1f} | {ratio} |")
    return lines


def _summary(data: dict, kind: str) -> list[str]:
    """Per method: geometric mean over the budgets of the perplexity increase, its ratio to block
    influence's, and the mean generative score: one line to rank methods that win at different budgets."""
    by_method: dict[str, list] = {}
    for r in rows(data, kind):
        by_method.setdefault(r["method"], []).append(r)
    base = data["evals"]["original"]["perplexity"]
    n_budgets = max(len(rs) for rs in by_method.values())

    def geomean(rs) -> float:
        return math.exp(sum(math.log(max(r["eval"]["perplexity"] - base, 1e-9)) for r in rs) / len(rs))

    full = {name: rs for name, rs in by_method.items() if len(rs) == n_budgets}
    reference = full.get("block influence (ShortGPT)")
    lines = ["| method | geometric-mean ppl increase | x block influence's | mean generative score | x BI wall |",
             "|---|---|---|---|---|"]
    for name, rs in sorted(full.items(), key=lambda kv: geomean(kv[1])):
        ratio = f"{geomean(rs) / geomean(reference):.2f}" if reference else ""
        walls = [r["bi_ratio"] for r in rs if r["bi_ratio"] is not None]
        wall = f"{min(walls):.0f}-{max(walls):.0f}" if walls else ""
        lines.append(f"| {name} | {geomean(rs):.1f} | {ratio} | "
                     f"{sum(r['eval']['generative_mean'] for r in rs) / len(rs):.2f} | {wall} |")
    return lines


def _versus(data: dict, kind: str) -> list[str]:
    """Each method's plan against the reference method's plan at the same budget, paired."""
    out = []
    for name, m in data["methods"].items():
        if (m["kind"] == "heads") != (kind == "heads"):
            continue
        for budget, v in data.get("versus", {}).get(name, {}).items():
            out.append((float(budget), v, name, budget))
    if not out:
        return []
    reference = out[0][1]["reference"].removeprefix("heads/")
    lines = [f"Against **{reference}** at the same budget, paired on the same windows and items "
             "(negative perplexity change and positive generative change favour the method):", "",
             f"| {'layers dropped' if kind == 'layers' else 'heads pruned'} | method | perplexity change "
             "| generative-mean change |", "|---|---|---|---|"]
    for b, v, name, budget in sorted(out, key=lambda t: (t[0], t[1].get("perplexity", {}).get("change", 0))):
        label = budget if kind == "layers" else f"{b:.0%}"
        if v.get("same_plan"):
            lines.append(f"| {label} | {name.removeprefix('heads/')} | same plan | same plan |")
            continue
        lines.append(f"| {label} | {name.removeprefix('heads/')} | {change_text(v['perplexity'], 1) or ''} | "
                     f"{change_text(v.get('generative_mean'), 3) or ''} |")
    return lines


def _correlations(data: dict) -> list[str]:
    lines = ["| scorer (profile) | units | metric | n | Spearman | Kendall |", "|---|---|---|---|---|---|"]
    for key, c in sorted(data["correlations"].items()):
        name, kind, metric = key.split("/")
        lines.append(f"| {name} | {kind} | {metric} | {c['n']} | {c['spearman']:.3f} | {c['kendall']:.3f} |")
    return lines


def _plot(data: dict, kind: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list] = {}
    for r in rows(data, kind):
        by_method.setdefault(r["method"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab20").colors
    budgets = sorted({float(r["budget"]) for rs in by_method.values() for r in rs})
    for n, (name, rs) in enumerate(sorted(by_method.items())):
        rs.sort(key=lambda r: float(r["budget"]))
        x = [float(r["budget"]) for r in rs]
        style = {"marker": "osD^v<>"[n % 7], "ls": ("-", "--", ":")[n // 7 % 3], "color": colors[n % 20],
                 "label": name}
        for ax, metric, interval in ((axes[0], "perplexity", "perplexity_interval"),
                                     (axes[1], "generative_mean", "generative_interval")):
            y = [r["eval"][metric] for r in rs]
            if all(interval in r["eval"] for r in rs):  # 95% error bars (scorers.json version 2)
                yerr = [[v - r["eval"][interval][0] for v, r in zip(y, rs)],
                        [r["eval"][interval][1] - v for v, r in zip(y, rs)]]
                ax.errorbar(x, y, yerr=yerr, capsize=2, elinewidth=0.7, **style)
            else:
                ax.plot(x, y, **style)
    for ax in axes:
        ax.set_xticks(budgets, [f"{b:g}" if kind != "heads" else f"{b:.0%}" for b in budgets])
    base = data["evals"]["original"]
    axes[0].axhline(base["perplexity"], color="grey", ls=":", label="original")
    axes[1].axhline(base["generative_mean"], color="grey", ls=":")
    axes[0].set_yscale("log")
    xlabel = "layers dropped (sublayers: same parameters)" if kind == "layers" else "fraction of heads pruned"
    for ax, title in zip(axes, ("evaluation perplexity (log), 95% intervals", "generative tasks, mean exact match")):
        ax.set_xlabel(xlabel)
        ax.set_title(title)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"SmolLM2-135M: {kind} removed by each scorer's plan")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(data: dict, out: Path) -> Path:
    base = data["evals"]["original"]
    cal, ev = data["calibration"], data["evaluation"]
    lines = ["# Scorers compared: the plans they produce, evaluated", "",
             f"Made by `python benchmarks/scorers.py` (data: reports/scorers.json). {data['model']}, fp32, "
             f"{data['threads']} CPU threads. Calibration: {cal['n_samples']} x {cal['seq_len']} tokens of "
             f"{cal['source']} ({cal['split']} windows). Judged on {ev['n_samples']} x {ev['seq_len']} "
             f"{ev['split']} windows of {ev['text']} and on {_items_judged(ev)} of the shipped tasks. Wall "
             "times are "
             "noisy on a shared CPU; forward-pass equivalents (work in full forwards of one 4-window "
             "calibration batch) are exact.", "",
             f"Original model: perplexity {base['perplexity']:.2f}{_interval(base, 'perplexity_interval', 2)}, "
             + ", ".join(f"{t} {base['tasks'][k]:.2f}{_interval(base.get('task_intervals', {}), k, 2)}"
                         + (f" ({base['n_items'][k]} items)" if "n_items" in base else "") for k, t in _tasks(data))
             + f", generative mean {base['generative_mean']:.2f}{_interval(base, 'generative_interval', 2)}.", "",
             PAIRED_NOTE if data["version"] >= 2 else UNPAIRED_NOTE, ""]
    for kind, title in (("layers", "Dropping layers (or the same parameters as sublayers)"),
                        ("heads", "Pruning attention heads (free per-layer counts)")):
        if rows(data, kind):
            lines += [f"## {title}", "", *_table(data, kind), "", f"![{kind}](scorers-{kind}.png)", "",
                      "Summary over the budgets:", "", *_summary(data, kind), ""]
            if versus := _versus(data, kind):
                lines += [*versus, ""]
            _plot(data, kind, out / f"scorers-{kind}.png")
    if data.get("notes"):
        lines += ["## Notes on this run", "", *[f"- {n}" for n in data["notes"]], ""]
    if data["correlations"]:
        lines += ["## Rank correlation with exact ablation", "", *_correlations(data), ""]
    path = out / "scorers.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return path
