"""reports/width.md and reports/width.png, from the finished cells of benchmarks/width.py.

Every change is against the original, paired on the same items (tasks: McNemar) and windows
(perplexity: bootstrap over windows); `*` marks a change significant at 95%.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mi_opt.evaluate.paired import result_changes  # noqa: E402
from mi_opt.evaluate.result import EvalResult  # noqa: E402

GENERATIVE = ("miopt_arithmetic", "miopt_capitals", "miopt_name_lookup", "miopt_sequences")
LABELS = {"depth": "depth (layers)", "heads": "heads", "neurons": "neurons (free)",
          "neurons-uniform": "neurons (uniform, signed first-order score)", "joint": "joint"}
ORDER = ["depth", "heads", "neurons", "neurons-uniform", "joint"]
SHORT = {"miopt_facts_mc": "MC", "miopt_arithmetic": "arith", "miopt_capitals": "capitals",
         "miopt_name_lookup": "lookup", "miopt_sequences": "sequences"}


def _load(out: Path) -> dict[str, dict]:
    cells = {}
    for path in sorted((out / "cells").glob("*.json")):
        if path.name.endswith(".eval.json") or path.name.endswith(".lm_eval.json"):
            continue
        cell = json.loads(path.read_text())
        eval_path = out / "cells" / f"{path.stem}.eval.json"
        cell["eval"] = EvalResult.load(eval_path) if eval_path.exists() else None
        cells[path.stem] = cell
    return cells


def _correct(cell: dict) -> int:
    """Generative items answered right (of every generative item)."""
    return round(sum(cell["tasks"][t] * cell["n_items"][t] for t in GENERATIVE))


def _mark(change: dict) -> str:
    return "*" if change.get("significant") else ""


def _speed(cell: dict, speed: dict | None, key: str) -> str:
    """The plan's speedup over the original from the shared A/B pass (healed: its plan's shapes)."""
    label = f"{cell['budget']}-{cell['kind']}"
    if not speed or label not in speed["vs_baseline"]:
        return "-"
    r = speed["vs_baseline"][label][key]
    return f"{r['median']:.2f}x [{r['q1']:.2f}, {r['q3']:.2f}]"


def _row(cell: dict, original: dict, speed: dict | None) -> str:
    ch = result_changes(original["eval"], cell["eval"])
    ppl = cell["perplexity"]
    lo, hi = cell["eval"].perplexity["interval"]
    removed = 1 - cell["decoder_params"] / original["decoder_params"]
    tasks = " | ".join(f"{cell['tasks'][t]:.3f}{_mark(ch[t])}" for t in SHORT)
    label = LABELS.get(cell["kind"], cell["kind"])
    if cell.get("same_plan_as"):
        label += f" (chose {cell['same_plan_as'].split('-')[1]}'s plan)"
    return (f"| {label} | {'healed' if cell['heal'] else '-'} | {removed:.1%} | "
            f"{ppl:.2f} [{lo:.1f}, {hi:.1f}]{_mark(ch['perplexity'])} | {cell['perplexity_kjv']:.2f} | {tasks} | "
        f"{_correct(cell)} | {_speed(cell, speed, 'decode_tokens_per_s')} | {_speed(cell, speed, 'prefill_ms')} |")


def _speed_note(speed: dict | None) -> list[str]:
    if speed is None:
        return ["Speed: not timed yet (`python benchmarks/width.py --speed`)."]
    from mi_opt.evaluate.ab_speed import summary_lines

    return summary_lines(speed)


def _best_width(cells: dict, budget: int, heal: bool) -> tuple[str, dict] | None:
    # a joint plan that chose pure depth is no width plan
    options = [(n, c) for n, c in cells.items() if c.get("budget") == budget and c["kind"] in ("heads", "neurons", "joint")
               and bool(c["heal"]) == heal and not c.get("same_plan_as", "").startswith(f"{budget}-depth")]
    return min(options, key=lambda nc: nc[1]["perplexity"]) if options else None


def _verdicts(cells: dict, original: dict) -> list[str]:
    lines = []
    for budget in sorted({c["budget"] for c in cells.values() if c.get("budget")}):
        for heal in (False, True):
            depth = cells.get(f"{budget}-depth-{'healed' if heal else 'unhealed'}")
            best = _best_width(cells, budget, heal)
            if not depth or not best:
                continue
            name, width = best
            rise_depth = depth["perplexity"] - original["perplexity"]
            rise_width = width["perplexity"] - original["perplexity"]
            lines.append(f"- {budget}% removed, {'healed' if heal else 'unhealed'}: best width plan {width['kind']} "
                         f"raises perplexity by {rise_width:+.2f} against depth's {rise_depth:+.2f} "
                         f"(**{rise_width / rise_depth:.2f}x**); generative items right {_correct(width)} vs "
                         f"{_correct(depth)} (original {_correct(original)}).")
    return lines


def _plot(cells: dict, original: dict, path: Path) -> None:
    """Perplexity with its 95% interval per plan, unhealed and healed, one panel per budget (a
    joint plan that chose another plan's removal is drawn once, as that plan)."""
    budgets = sorted({c["budget"] for c in cells.values()})
    fig, axes = plt.subplots(1, len(budgets), figsize=(3.2 + 2.6 * len(budgets), 4), squeeze=False, sharey=True)
    for ax, budget in zip(axes[0], budgets):
        kinds = [k for k in ORDER if any(c["kind"] == k and c["budget"] == budget and not c.get("same_plan_as")
                                         for c in cells.values())]
        for j, (heal, color) in enumerate(((False, "C3"), (True, "C0"))):
            for i, kind in enumerate(kinds):
                cell = next((c for c in cells.values() if c["budget"] == budget and c["kind"] == kind
                             and bool(c["heal"]) == heal), None)
                if cell is None:
                    continue
                lo, hi = cell["eval"].perplexity["interval"]
                ppl = cell["perplexity"]
                ax.errorbar(i + (j - 0.5) * 0.25, ppl, yerr=[[ppl - lo], [hi - ppl]], fmt="o", color=color,
                            capsize=3, label=("healed" if heal else "unhealed") if i == 0 else None)
        ax.axhline(original["perplexity"], color="grey", lw=0.8, label="original")
        ax.set_xticks(range(len(kinds)), [LABELS.get(k, k).split(" (")[0] + ("\n(uniform)" if "uniform" in k else "")
                                          for k in kinds], fontsize=8)
        ax.set_title(f"{budget}% of the decoder removed", fontsize=9)
        ax.set_yscale("log")
    axes[0][0].set_ylabel("perplexity, 95% interval (handbook+KJV)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(out: Path, planned: dict) -> None:
    cells = _load(out)
    speed = json.loads((out / "speed.json").read_text()) if (out / "speed.json").exists() else None
    original = cells.pop("original", None)
    if original is None or original["eval"] is None:
        print("no original cell yet: nothing to render")
        return
    header = ("| plan | heal | decoder removed | perplexity [95%] | KJV | " + " | ".join(SHORT.values())
              + " | generative right | decode speedup [IQR] | prefill speedup [IQR] |")
    rule = "|" + "---|" * (header.count("|") - 1)
    lines = ["# Width or depth? (SmolLM2-135M)", "",
             "Made by `python benchmarks/width.py` (resumable; `--render` rebuilds this page). Every cell applies "
             "one plan to the bundled model, heals it or not, and is scored on every item of the five shipped "
             "tasks and 16 x 256-token evaluation windows; `*` marks a change from the original that a paired "
             "test (McNemar on the same items, bootstrap over the same windows) finds significant at 95%. "
             "Speed (`--speed`): the original and every plan timed in one process, interleaved rounds; "
             "speedups are medians of per-round ratios with their interquartile range; a healed model has "
             "its plan's shapes, so its plan's speed.", ""] + _speed_note(speed) + ["",
             f"Original: perplexity {original['perplexity']:.2f}, KJV {original['perplexity_kjv']:.2f}, "
             + ", ".join(f"{SHORT[t]} {original['tasks'][t]:.3f}" for t in SHORT)
             + f"; {_correct(original)} of {sum(original['n_items'][t] for t in GENERATIVE)} generative items right.",
             ""]
    for budget in sorted({c["budget"] for c in cells.values()}):
        lines += [f"## {budget}% of decoder parameters removed", "", header, rule]
        rows = sorted((c for c in cells.values() if c["budget"] == budget),
                      key=lambda c: (bool(c["heal"]), ORDER.index(c["kind"]) if c["kind"] in ORDER else 99))
        lines += [_row(c, original, speed) for c in rows]
        lines.append("")
    lines += ["## Width or depth?", ""] + (_verdicts(cells, original) or ["- not measured yet"]) + [""]
    missing = [n for n in planned if n not in cells]
    if missing:
        lines += ["Not run yet: " + ", ".join(missing) + ".", ""]
    _plot(cells, original, out.parent / "width.png")
    lines += ["![perplexity against parameters removed](width.png)", ""]
    (out.parent / "width.md").write_text("\n".join(lines))
    print(f"wrote {out.parent / 'width.md'}")
