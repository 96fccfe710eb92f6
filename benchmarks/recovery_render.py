"""reports/recovery.md and its plots, from the finished cells of benchmarks/recovery.py.

    python benchmarks/recovery_render.py    # prints the README's condensed recovery table
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mi_opt.evaluate.paired import change_text, perplexity_change, result_changes  # noqa: E402
from mi_opt.evaluate.result import EvalResult  # noqa: E402
from mi_opt.evaluate.stats import binomial_interval  # noqa: E402

SHORT = {"miopt_facts_mc": "facts (MC)", "miopt_arithmetic": "arithmetic", "miopt_capitals": "capitals",
         "miopt_name_lookup": "name lookup", "miopt_sequences": "sequences"}
# cells made before they recorded which tasks generate
OLD_GENERATIVE = ("miopt_arithmetic", "miopt_capitals")


def _load(out: Path, cells: dict) -> tuple[dict | None, dict]:
    """The original's cell and the finished cells scored on the same task items as it. A cell
    measured after the task files changed (other item counts) is left out, said so at the end:
    comparing its scores with the original's would compare different questions. Each cell's
    per-item results, where kept, come along under "eval"."""
    found = {}
    for path in (out / "cells").glob("*.json"):
        if path.name.endswith((".eval.json", ".lm_eval.json")):
            continue
        found[path.stem] = json.loads(path.read_text())
        beside = path.with_name(f"{path.stem}.eval.json")
        found[path.stem]["eval"] = EvalResult.load(beside) if beside.exists() else None
    original = found.get("original")
    same = {n: found[n] for n in cells if n in found
            and (original is None or found[n].get("n_items") == original.get("n_items"))}
    for n in sorted(set(cells) & set(found) - set(same)):
        print(f"left out {n}: scored on {found[n].get('n_items')} task items, the original on "
              f"{original.get('n_items')}; `python benchmarks/recovery.py` measures it again (a cell without "
              "per-item results is remeasured; delete its cells/ files to force it)")
    return original, same


def _generative_tasks(cell: dict) -> tuple[str, ...]:
    return tuple(cell.get("generative") or OLD_GENERATIVE)


def _generative(cell: dict) -> float:
    tasks = _generative_tasks(cell)
    return sum(cell["tasks"][t] for t in tasks) / len(tasks)


def _changes(base: dict | None, cell: dict) -> dict:
    """cell - base, paired on the same items and windows (KJV included); {} without per-item results."""
    if not base or base.get("eval") is None or cell.get("eval") is None:
        return {}
    out = result_changes(base["eval"], cell["eval"])
    out["perplexity_kjv"] = perplexity_change(base.get("kjv"), cell.get("kjv"))
    return out


def _mark(changes: dict, metric: str) -> str:
    return "*" if (changes.get(metric) or {}).get("significant") else ""


def _ratio(value: float, unhealed: float, original: float) -> float:
    """How much of the unhealed perplexity increase remains (1 = none recovered, 0 = all)."""
    return (value - original) / (unhealed - original)


def _remaining(cell: dict, unhealed: dict | None, original: dict, key: str) -> str | None:
    """'0.46x' for a healed cell whose plan has an unhealed cell; None otherwise."""
    if not (cell["heal"] and unhealed):
        return None
    return f"{_ratio(cell[key], unhealed[key], original[key]):.2f}x"


def _comparisons(cell: dict, unhealed: dict | None, original: dict) -> tuple[dict, dict]:
    """(cell vs the original, cell vs its unhealed plan: what healing bought), each paired."""
    vs_original = _changes(original, cell) if cell is not original else {}
    return vs_original, (_changes(unhealed, cell) if cell["heal"] and unhealed else {})


def _heal_words(heal: dict | None) -> str:
    if heal is None:
        return "none"
    words = {"local": "local repair", "distill": "distill", "local+distill": "local repair + distill"}[heal["method"]]
    if heal["method"] != "local":
        words += f", {heal.get('train', 'localized')}, {heal['steps']} steps"
    if heal.get("self_generated"):
        words += f", {heal['self_generated']:.0%} teacher-written"
    if heal.get("adapters") == "keep":
        words += ", adapters kept unmerged"
    return words


def _row(name: str, cell: dict, unhealed: dict | None, original: dict) -> str:
    rec = cell.get("heal_record")
    heal = cell["heal"]
    how = "-" if heal is None else _heal_words(heal)
    tokens = f"{_tokens(rec):,}" if rec else "-"
    wall = f"{rec['cost']['wall_time_s']:.0f}" if rec else "-"
    ratio, ratio_kjv = (_remaining(cell, unhealed, original, k) or ("1x" if unhealed else "-")
                        for k in ("perplexity", "perplexity_kjv"))
    vs_original, healing = _comparisons(cell, unhealed, original)
    tasks = " | ".join(_score(cell, t) + _mark(vs_original, t) for t in _task_columns(original))
    return (f"| {name} | {how} | {tokens} | {wall} | {_ppl(cell, 'perplexity')}{_mark(vs_original, 'perplexity')} "
            f"| {ratio} | {_ppl(cell, 'perplexity_kjv')}{_mark(vs_original, 'perplexity_kjv')} | {ratio_kjv} "
            f"| {tasks} | {_generative(cell):.3f}{_mark(vs_original, 'generative_mean')} "
            f"| {change_text(healing.get('perplexity'), 1) or '-'} "
            f"| {change_text(healing.get('generative_mean'), 3) or '-'} |")


def _task_columns(original: dict) -> list[str]:
    return [t for t in original["tasks"] if t not in _generative_tasks(original)] + list(_generative_tasks(original))


def _ppl(cell: dict, key: str) -> str:
    """Perplexity with its 95% interval where the cell kept one."""
    interval = (cell["eval"].perplexity.get("interval") if key == "perplexity" and cell.get("eval")
                else (cell.get("kjv") or {}).get("interval") if key == "perplexity_kjv" else None)
    return f"{cell[key]:.2f}" + (f" [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else "")


def _score(cell: dict, task: str) -> str:
    """A right/wrong task's score with its exact 95% interval."""
    if task not in cell["tasks"]:
        return "-"
    score, n = cell["tasks"][task], cell.get("n_items", {}).get(task)
    if not n:
        return f"{score:.3f}"
    low, high = binomial_interval(round(score * n), n)
    return f"{score:.3f} [{low:.2f}, {high:.2f}]"


def _tokens(rec: dict) -> int:
    return rec["data"].get("tokens", rec["cost"]["tokens"])  # cells made before cost counted local windows


def _x(cell: dict, key: str) -> float:
    rec = cell["heal_record"]
    return 0 if rec is None else _tokens(rec) if key == "tokens" else rec["cost"][key]


# The targets: plan -> (max remaining perplexity increase, extra checks on the best heal).
TARGETS = {"drop7": 0.35, "heads-third": 0.35, "bits-mix": 0.5}


def _targets(original: dict, found: dict) -> list[str]:
    lines = ["## Targets (issue 17), best heal of each plan by perplexity", "",
             "| plan | best heal | remaining increase (target) | other targets | heal wall time (target 15 min) |",
             "|---|---|---|---|---|"]
    for plan, limit in TARGETS.items():
        unhealed = found.get(f"{plan}-unhealed")
        healed = {n: c for n, c in found.items() if c["plan"] == plan and c["heal"]}
        if not unhealed or not healed:
            lines.append(f"| {plan} | not measured | | | |")
            continue
        name, best = min(healed.items(), key=lambda kv: kv[1]["perplexity"])
        remaining = _ratio(best["perplexity"], unhealed["perplexity"], original["perplexity"])
        t, o = best["tasks"], original["tasks"]
        if plan == "drop7":
            other = (f"generative mean {_generative(best):.3f} vs 0.6 x {_generative(original):.3f} = "
                     f"{0.6 * _generative(original):.3f} ({'met' if _generative(best) >= 0.6 * _generative(original) else 'not met'}); "
                     f"multiple choice {t['miopt_facts_mc']:.3f} vs {o['miopt_facts_mc']:.3f} - 0.05 "
                     f"({'met' if t['miopt_facts_mc'] >= o['miopt_facts_mc'] - 0.05 else 'not met'})")
        elif plan == "heads-third":
            other = (f"capitals {t['miopt_capitals']:.3f} vs half of {o['miopt_capitals']:.3f} "
                     f"({'met' if t['miopt_capitals'] >= o['miopt_capitals'] / 2 else 'not met'})")
        else:
            other = "-"
        wall = best["heal_record"]["cost"]["wall_time_s"]
        lines.append(f"| {plan} | {name} | {remaining:.2f}x (<= {limit}x: {'met' if remaining <= limit else 'not met'}) "
                     f"| {other} | {wall / 60:.1f} min ({'met' if wall <= 900 else 'not met'}) |")
    local, short, long = (found.get(n) for n in ("drop7-distill-localized-40", "drop7-distill-all-15",
                                                  "drop7-distill-all-40"))
    if local and short and long:
        t, t0, t1 = (c["heal_record"]["cost"]["wall_time_s"] for c in (local, short, long))
        # all weights' perplexity at localized's wall time, interpolated between its two budgets
        at = short["perplexity"] + (long["perplexity"] - short["perplexity"]) * (t - t0) / (t1 - t0)
        lines += ["", f"Localized against all weights at equal wall time (drop 7, distillation only): localized "
                  f"reached {local['perplexity']:.2f} in {t:.0f} s; all weights reached {short['perplexity']:.2f} "
                  f"in {t0:.0f} s and {long['perplexity']:.2f} in {t1:.0f} s, so about {at:.2f} at {t:.0f} s. "
                  f"Target (localized at least as good): {'met' if local['perplexity'] <= at else 'not met'}."]
    return lines + [""]


# The questions the cells were laid out to answer, each as (question, A, B): B - A, paired on the
# same items and windows. Pairs with a cell not yet measured are skipped.
HEAD_TO_HEAD = (
    ("LoRA (rank 16) instead of every weight (drop 7, 40 steps)", "drop7-distill-all-40", "drop7-distill-lora-40"),
    ("half the windows teacher-written (drop 7, all, 40 steps)", "drop7-distill-all-40", "drop7-distill-all-40-self"),
    ("localized, 40 steps, against every weight, 15 steps (nearest in time)", "drop7-distill-all-15",
     "drop7-distill-localized-40"),
    ("local repair before localized distillation (drop 7, 40 steps)", "drop7-distill-localized-40",
     "drop7-local+distill-localized-40"),
    ("120 steps instead of 40 (drop 7, local + distill)", "drop7-local+distill-localized-40",
     "drop7-local+distill-localized-120"),
    ("exact ablation's 4-layer plan instead of block influence's, unhealed", "drop4-unhealed", "drop4-causal-unhealed"),
    ("the same, healed (local + distill, 20 steps)", "drop4-local+distill-localized-20",
     "drop4-causal-local+distill-localized-20"),
    ("6 layers dropped instead of 4, healed", "drop4-local+distill-localized-20", "drop6-local+distill-localized-40"),
    ("adapters kept unmerged instead of merged and requantized (bits-mix)", "bits-mix-distill-localized-20",
     "bits-mix-distill-localized-20-keep"),
)


def _head_to_head(found: dict) -> list[str]:
    lines = ["## Head to head", "", "B - A on the same items and windows; `*` = significant by the paired test.", "",
             "| question | A | B | perplexity | KJV perplexity | facts (MC) | generative mean |", "|---|---|---|---:|---:|---:|---:|"]
    for question, a, b in HEAD_TO_HEAD:
        if a not in found or b not in found:
            continue
        changes = _changes(found[a], found[b])
        cols = [change_text(changes.get(k), d) or "-" for k, d in
                (("perplexity", 2), ("perplexity_kjv", 2), ("miopt_facts_mc", 3), ("generative_mean", 3))]
        lines.append(f"| {question} | {a} | {b} | " + " | ".join(cols) + " |")
    return lines + [""]


def _plot(original: dict, cells: dict, out: Path) -> list[str]:
    written = []
    for x_key, label, fname in (("tokens", "training tokens", "recovery-tokens.png"),
                                ("wall_time_s", "heal wall time (s, 2 CPU cores)", "recovery-time.png")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        plans = sorted({c["plan"] for c in cells.values()})
        for plan in plans:
            points = sorted((_x(c, x_key), c["perplexity"] -
                             original["perplexity"], _generative(c), c["heal"]["method"] if c["heal"] else "none")
                            for c in cells.values() if c["plan"] == plan)
            xs = [p[0] for p in points]
            axes[0].scatter(xs, [p[1] for p in points], label=plan)
            axes[1].scatter(xs, [p[2] for p in points], label=plan)
            for p in points:
                axes[0].annotate(p[3], (p[0], p[1]), fontsize=6)
        axes[0].set_ylabel("perplexity increase over the original")
        axes[0].set_yscale("log")
        axes[1].set_ylabel("generative-task mean")
        axes[1].axhline(_generative(original), color="grey", linestyle="--", label="original")
        for ax in axes:
            ax.set_xlabel(label)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.parent / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def render(out: Path, cells: dict) -> Path | None:
    original, found = _load(out, cells)
    if original is None or not found:
        return None
    lines = ["# Recovery after compression (SmolLM2-135M-Instruct, 2 CPU cores)", "",
             "Made by `python benchmarks/recovery.py` (resumable; cells in reports/recovery/cells/). Healing text: "
             "calibration windows of the Debian handbook excerpt (never evaluation windows, never task items). "
             "Perplexity on 16 x 256 evaluation windows of handbook + KJV (the recipes' setting) and, separately, "
             "of the KJV alone, a domain healing never trains on. Tasks: every item. 'remaining' is the share of "
             "the unhealed perplexity increase that is left (0 = fully recovered).", "",
             "| cell | heal | tokens | heal s | perplexity | remaining | KJV ppl | remaining (KJV) | "
             + " | ".join(SHORT.get(t, t) for t in _task_columns(original))
             + " | generative mean | healing: paired ppl change | healing: paired generative change |",
             "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(_task_columns(original)) + "---:|---:|---:|",
             _row("original", original, None, original)]
    for name, cell in found.items():
        unhealed = found.get(f"{cell['plan']}-unhealed")
        lines.append(_row(name, cell, unhealed, original))
    items = ", ".join(f"{k}: {v}" for k, v in original.get("n_items", {}).items())
    paired = original.get("eval") is not None and all(c.get("eval") is not None for c in found.values())
    lines += ["", f"Items per task: {items}. [low, high]: exact 95% (Clopper-Pearson) interval for tasks, "
              "bootstrap over windows for perplexity. "
              + ("`*` marks a change from the original that a paired test finds significant at 95% (McNemar on "
                 "the same items; paired bootstrap over the same windows; for the generative mean, a normal test "
                 "from the tasks' paired changes). The 'healing' columns pair each healed cell with its plan's "
                 "unhealed cell the same way: what healing bought, with its interval."
                 if paired else "Some cells keep no item-level results, so they carry no paired test: read their "
                 "task differences as real only where the intervals are apart."), "", *_targets(original, found),
              *_head_to_head(found)]
    if (out / "NOTES.md").exists():  # what this particular run was like (machine load, what it left out)
        lines += [(out / "NOTES.md").read_text().strip(), ""]
    lines += [f"![recovery against tokens]({f})" for f in _plot(original, found, out)]
    path = out.parent / "recovery.md"
    path.write_text("\n".join(lines) + "\n")
    strip = lambda cell: {k: v for k, v in cell.items() if k != "eval"}  # noqa: E731 (per-item results stay in cells/)
    (out.parent / "recovery.json").write_text(json.dumps({"original": strip(original),
                                                          "cells": {n: strip(c) for n, c in found.items()}}, indent=1) + "\n")
    return path


# The README's rows, grouped by plan: depth plans by layers dropped, then heads, then bits.
README_PLANS = ("drop4", "drop4-causal", "drop6", "drop7", "drop8", "heads-quarter", "heads-third", "bits-mix")


def readme_table(out: Path, cells: dict) -> str:
    """The README's table: one row per cell, grouped by plan; scores marked * where the paired test
    against the original says so, and what healing bought paired against the unhealed cell."""
    original, found = _load(out, cells)
    tasks = _task_columns(original)
    lines = ["| plan | heal | heal time | perplexity (remaining) | KJV only (remaining) | "
             + " | ".join(SHORT.get(t, t) for t in tasks) + " | generative mean | healing bought: perplexity "
             "| healing bought: generative |", "|---|---|---:|---:|---:|" + "---:|" * len(tasks) + "---:|---:|---:|"]
    rows = [("original", original)] + sorted(
        ((n, c) for n, c in found.items() if c["plan"] in README_PLANS),
        key=lambda kv: (README_PLANS.index(kv[1]["plan"]), kv[1]["heal"] is not None, list(cells).index(kv[0])))
    for name, cell in rows:
        unhealed = found.get(f"{cell['plan']}-unhealed") if cell["plan"] else None
        vs_original, healing = _comparisons(cell, unhealed, original)
        rec = cell.get("heal_record")
        values = []
        for key in ("perplexity", "perplexity_kjv"):
            ratio = _remaining(cell, unhealed, original, key)
            values.append(f"{cell[key]:.2f}{_mark(vs_original, key)}" + (f" ({ratio})" if ratio else ""))
        values += [f"{cell['tasks'][t]:.3f}{_mark(vs_original, t)}" for t in tasks]
        values.append(f"{_generative(cell):.3f}{_mark(vs_original, 'generative_mean')}")
        values += [change_text(healing.get("perplexity"), 1) or "-", change_text(healing.get("generative_mean"), 3) or "-"]
        wall = f"{rec['cost']['wall_time_s'] / 60:.1f} min" if rec else "-"
        lines.append(f"| {cell['plan'] or 'original'} | {_heal_words(cell['heal']) if cell['plan'] else '-'} | {wall} | "
                     + " | ".join(values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python benchmarks/recovery_render.py: the README's table
    from recovery import CELLS, OUT  # the script's own folder is on sys.path when run as a script

    print(readme_table(OUT, CELLS))
