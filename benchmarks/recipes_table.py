"""The README's table of shipped recipes, from reports/recipes/comparison/compare.json.

    python benchmarks/recipes_table.py          # prints the Markdown table

bash benchmarks/recipe_reports.sh makes the comparison; this only condenses it: every task
score with its exact 95% interval, * where the paired test on the same items says the change is
significant, and speed as the A/B speedups (median of per-round ratios, interquartile range).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPARISON = ROOT / "reports" / "recipes" / "comparison" / "compare.json"
COLUMNS = {"drop-quarter-layers": "drop 7 layers (BI)", "drop-quarter-layers-causal": "drop 7 (BI + exact boundary)",
           "prune-third-heads": "prune 1/3 heads", "task-aware-arithmetic": "same, task-aware",
           "bits-4-8-mix": "4/8-bit mix", "combined": "combined"}
ROWS = {"perplexity": ("perplexity", "{:.2f}"), "miopt_facts_mc acc": ("facts (multiple choice)", "{:.3f}"),
        "miopt_arithmetic exact_match": ("arithmetic", "{:.3f}"), "miopt_capitals exact_match": ("capitals", "{:.3f}"),
        "miopt_name_lookup exact_match": ("name lookup", "{:.3f}"),
        "miopt_sequences exact_match": ("sequences", "{:.3f}"), "task mean": ("task mean", "{:.3f}")}
SPEED = {"decode tokens/s": "decode", "prefill ms": "prefill"}


def _interval(row: dict, label: str, fmt: str) -> str:
    low_high = row.get("intervals", {}).get(label)
    return f" [{fmt.format(low_high[0])}, {fmt.format(low_high[1])}]" if low_high else ""


def _cell(row: dict, label: str, fmt: str, baseline: str) -> str:
    value = row["values"].get(label)
    if value is None:
        return "-"
    mark = "*" if label != baseline and (row.get("paired", {}).get(label) or {}).get("significant") else ""
    return fmt.format(value) + _interval(row, label, fmt) + mark


def _speed_cell(row: dict, label: str, baseline: str, unit: str) -> str:
    if label == baseline:
        return f"{row['values'][label]:.1f} {unit}"
    change = (row.get("paired") or {}).get(label)
    if not change:
        return "-"
    low, high = change["interval"]
    return f"{change['change']:.2f}x [{low:.2f}, {high:.2f}]" + ("*" if change.get("significant") else "")


def table(comparison: dict) -> str:
    labels = [lb for lb in comparison["labels"] if lb in COLUMNS or lb == comparison["baseline"]]
    base = comparison["baseline"]
    rows = {r["metric"]: r for r in comparison["rows"]}
    lines = ["| | " + " | ".join("original" if lb == base else COLUMNS[lb] for lb in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for metric, (name, fmt) in ROWS.items():
        lines.append(f"| {name} | " + " | ".join(_cell(rows[metric], lb, fmt, base) for lb in labels) + " |")
    for metric, name in SPEED.items():
        unit = "tokens/s" if metric.startswith("decode") else "ms"
        lines.append(f"| {name} speedup (A/B) | "
                     + " | ".join(_speed_cell(rows[metric], lb, base, unit) for lb in labels) + " |")
    size = rows["size MB"]
    lines.append("| size MB | " + " | ".join(f"{size['values'][lb]:.0f}" for lb in labels) + " |")
    return "\n".join(lines)


def main() -> int:
    print(table(json.loads(COMPARISON.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
