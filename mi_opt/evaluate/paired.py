"""Paired changes between two EvalResults: the same items (tasks) or windows (perplexity) on
both sides, matched by what was asked, never by position alone.

A change is paired only when both results hold per-item results (eval.json version 2) for the
same prompts; otherwise the reason is returned instead, and reports print the values without a
significance verdict rather than guess one.
"""
from __future__ import annotations

from mi_opt.evaluate.stats import mean_of_changes, paired_change, paired_perplexity_change


def task_items(task: dict) -> dict[tuple[int, str], float]:
    """(doc_id, prompt hash) -> primary score of one task's result; empty for version-1 results."""
    items = task.get("items") or {}
    return {(d, h): s for d, h, s in zip(items.get("doc_id", []), items.get("prompt_hash", []), items.get("score", []))}


def task_change(base: dict | None, other: dict | None) -> dict:
    """Paired change of a task's primary score, or {"reason": why not}."""
    if not base or not other:
        return {"reason": "task not measured on both"}
    a, b = task_items(base), task_items(other)
    if not a or not b:
        return {"reason": "no per-item results (eval.json from mi-opt before version 2)"}
    shared = sorted(set(a) & set(b))
    if not shared:
        return {"reason": "no item in common (different items or prompts)"}
    out = paired_change([a[k] for k in shared], [b[k] for k in shared])
    if len(shared) < max(len(a), len(b)):
        out["note"] = f"paired on the {len(shared)} items both measured"
    return out


# What a perplexity result (evaluate/perplexity.py) must keep for perplexity_change to pair it later.
PAIRABLE_PERPLEXITY_KEYS = ("perplexity", "interval", "windows_hash", "window_nll_sum", "window_tokens")


def pairable_perplexity(result: dict) -> dict:
    """The part of a perplexity result worth storing: its value, interval and per-window sums."""
    return {k: result[k] for k in PAIRABLE_PERPLEXITY_KEYS}


def perplexity_change(base: dict | None, other: dict | None) -> dict:
    """Paired change of perplexity over the same windows, or {"reason": why not}."""
    if not base or not other:
        return {"reason": "perplexity not measured on both"}
    if "window_nll_sum" not in base or "window_nll_sum" not in other:
        return {"reason": "no per-window results (eval.json from mi-opt before version 2)"}
    if base.get("windows_hash") != other.get("windows_hash") or base["window_tokens"] != other["window_tokens"]:
        return {"reason": "different evaluation windows (text, seed, length or tokenizer differ)"}
    return paired_perplexity_change(base["window_nll_sum"], other["window_nll_sum"], base["window_tokens"])


def generative_tasks(result) -> list[str]:
    """The tasks of an EvalResult that generate their answer (lm-eval's generate_until)."""
    return [name for name, t in result.tasks.items() if t.get("output_type") == "generate_until"]


def result_changes(base, other) -> dict:
    """other - base for every task both measured, perplexity, and the mean of the generative tasks
    (which compression hurts most), each paired on the same items or windows; a change that can't
    be paired holds {"reason": ...} instead (the generative mean: None)."""
    changes = {name: task_change(base.tasks.get(name), task) for name, task in other.tasks.items()}
    changes["perplexity"] = perplexity_change(base.perplexity, other.perplexity)
    generative = [t for t in generative_tasks(other) if t in base.tasks]
    changes["generative_mean"] = mean_of_changes([changes[t] for t in generative]) if generative else None
    return changes


def change_text(change: dict | None, digits: int) -> str | None:
    """'+1.2 [0.3, 2.1]*': a paired change, its 95% interval (a bound that rounds to zero prints
    0, not -0) and `*` when significant; None when the change could not be paired."""
    if not change or "change" not in change:
        return None
    lo, hi = (round(v, digits) + 0.0 for v in change["interval"])
    return f"{change['change']:+.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]{'*' if change['significant'] else ''}"
