"""Side-by-side comparison of evaluations: every metric, its change against the first (baseline)
column, speedups and memory ratios; as a terminal table, Markdown, JSON and a Pareto plot."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mi_opt.artifacts import atomic_write_bytes, now, versions, write_json
from mi_opt.errors import MiOptError
from mi_opt.evaluate.paired import perplexity_change, task_change
from mi_opt.evaluate.result import EvalResult
from mi_opt.evaluate.stats import LEVEL, mean_of_changes, mean_of_scores

SCHEMA = "mi-opt/compare"
VERSION = 2  # 2: rows carry "intervals" and "paired" (the paired test of each change)
# Settings that must match for a comparison to be fair; differences are reported, not refused.
FAIR_SETTINGS = ("text_source", "ppl_samples", "ppl_seq_len", "seed", "tasks", "task_limit", "speed", "threads")


@dataclass
class Metric:
    """One row: values per column; `kind` says how a column is related to the baseline."""

    name: str
    values: list[float | None]
    higher_is_better: bool | None     # None: neither (sizes are reported as ratios only)
    kind: str = "delta"               # delta | speedup (base/value) | rate (value/base) | ratio (value/base)
    fmt: str = "{:.4g}"
    # Per column: the value's 95% interval [low, high], or None where it has none.
    intervals: list | None = None
    # Per column (None for the baseline): a paired change {change, interval, p_value, significant,
    # test} (evaluate/paired.py), or {"reason": ...} where no paired test applies.
    changes: list | None = None

    def change(self, i: int) -> dict | None:
        return self.changes[i] if self.changes and i < len(self.changes) else None

    def interval(self, i: int) -> list | None:
        return self.intervals[i] if self.intervals and i < len(self.intervals) else None

    def relation(self, i: int) -> float | None:
        paired = self.change(i)
        if paired and "change" in paired:  # a paired figure (e.g. the median of per-round ratios) wins
            return paired["change"]
        base, value = self.values[0], self.values[i]
        if base is None or value is None:
            return None
        if self.kind == "delta":
            return value - base
        if self.kind == "speedup":
            return base / value if value else None
        return value / base if base else None


def _task_rows(results: list[EvalResult]) -> list[Metric]:
    names = []
    for r in results:
        names += [n for n in r.tasks if n not in names]
    rows = []
    for name in names:
        ref = next(r.tasks[name] for r in results if name in r.tasks)
        metric = ref["primary"]
        rows.append(Metric(f"{name} {metric}", [r.tasks.get(name, {}).get("metrics", {}).get(metric) for r in results],
                           ref["higher_is_better"].get(metric, True),
                           intervals=[(r.tasks.get(name, {}).get("score") or {}).get("interval") for r in results],
                           changes=[None] + [task_change(results[0].tasks.get(name), r.tasks.get(name))
                                             for r in results[1:]]))
    if rows:
        rows.append(Metric("task mean", [r.task_mean() for r in results], True,
                           intervals=[(task_mean_score(r) or {}).get("interval") for r in results],
                           changes=[None] + [mean_of_changes([m.change(i) for m in rows])
                                             for i in range(1, len(results))]))
    return rows


def task_mean_score(result: EvalResult) -> dict | None:
    """The task mean with its interval, when every task has one."""
    return mean_of_scores([t.get("score") for t in result.tasks.values()])


def _speed(r: EvalResult, key: str, stat: str = "median") -> float | None:
    value = (r.speed or {}).get(key)
    return value.get(stat) if isinstance(value, dict) else value


def _timing_row(name: str, key: str, results: list[EvalResult], labels: list[str] | None, ab: dict | None,
                higher_is_better: bool, kind: str) -> Metric:
    """A timing row; with an A/B measurement, its spreads and per-round ratios (evaluate/ab_speed.py)."""
    row = Metric(name, [_speed(r, key) for r in results], higher_is_better, kind, "{:.1f}")
    if ab and labels:
        per_model = ab["per_model"]
        row.intervals = [[per_model[lb][key]["q1"], per_model[lb][key]["q3"]] if lb in per_model else None
                         for lb in labels]
        row.changes = [None] + [_ab_change(ab, lb, key) for lb in labels[1:]]
    return row


def _ab_change(ab: dict, label: str, key: str) -> dict:
    ratio = ab["vs_baseline"].get(label, {}).get(key)
    if ratio is None:
        return {"reason": "not in the A/B timing"}
    # A speedup counts only when its interquartile range of ratios excludes 1, on a machine no check
    # found busy, with its own ratios steady across rounds (artifacts before version 3: the whole
    # timing's verdict).
    reliable = ab["machine_reliable"] and key not in ab["unsteady"].get(label, ()) if "unsteady" in ab \
        else ab["reliable"]
    significant = bool(reliable and (ratio["q1"] > 1 or ratio["q3"] < 1))
    return {"change": ratio["median"], "interval": [ratio["q1"], ratio["q3"]], "significant": significant,
            "test": "median and IQR of per-round ratios, interleaved A/B", "reliable": reliable}


def metrics_table(results: list[EvalResult], labels: list[str] | None = None, speed_ab: dict | None = None
                  ) -> list[Metric]:
    rows = [Metric("perplexity", [(r.perplexity or {}).get("perplexity") for r in results], False,
                   intervals=[(r.perplexity or {}).get("interval") for r in results],
                   changes=[None] + [perplexity_change(results[0].perplexity, r.perplexity) for r in results[1:]]),
            Metric("bits per byte", [(r.perplexity or {}).get("bits_per_byte") for r in results], False,
                   intervals=[(r.perplexity or {}).get("bits_per_byte_interval") for r in results])]
    rows += _task_rows(results)
    rows += [_timing_row("prefill ms", "prefill_ms", results, labels, speed_ab, False, "speedup"),
             _timing_row("time to first token ms", "ttft_ms", results, labels, speed_ab, False, "speedup"),
             _timing_row("decode tokens/s", "decode_tokens_per_s", results, labels, speed_ab, True, "rate"),
             Metric("peak memory MB", [_mb(_speed(r, "peak_memory_bytes")) for r in results], False, "ratio", "{:.1f}"),
             Metric("parameters M", [_mb(_speed(r, "parameters")) for r in results], None, "ratio", "{:.2f}"),
             Metric("size MB", [_mb(_speed(r, "size_bytes")) for r in results], None, "ratio", "{:.1f}")]
    on_disk = Metric("size on disk MB", [_mb(_disk_bytes(r)) for r in results], None, "ratio", "{:.1f}")
    if on_disk.values != rows[-1].values:  # a second row only where it says something the first does not
        rows.append(on_disk)
    return [m for m in rows if any(v is not None for v in m.values)]


def _disk_bytes(r: EvalResult) -> float | None:
    """Bytes of the model's weight files, where known: measured from its folder, or recorded
    later (a run's exported checkpoint)."""
    speed = r.speed or {}
    if speed.get("disk_bytes") is not None:
        return speed["disk_bytes"]
    return speed.get("size_bytes") if str(speed.get("size_kind", "")).startswith("disk") else None


def size_in_memory(results: list[EvalResult]) -> bool:
    """Whether any "size MB" figure is bytes in memory (the dtype loaded, not the files' dtype)."""
    return any((r.speed or {}).get("size_kind") == "memory" for r in results)


def _mb(value: float | None) -> float | None:
    return None if value is None else value / 1e6


def _interval_text(interval: list | None, fmt: str = "{:.3g}") -> str:
    return f" [{fmt.format(interval[0])}, {fmt.format(interval[1])}]" if interval else ""


def _relation_text(m: Metric, i: int) -> str:
    """"(+0.05 [-0.02, +0.11])", then " *" when a paired test calls the change significant."""
    rel = m.relation(i)
    if rel is None:
        return ""
    paired = m.change(i) or {}
    mark = " *" if paired.get("significant") else ""
    if m.kind == "delta":
        return f"({rel:+.3g}{_interval_text(paired.get('interval'), '{:+.3g}')}){mark}"
    return f"(x{rel:.2f}{_interval_text(paired.get('interval'), '{:.2f}')}){mark}"


def unfair_settings(results: list[EvalResult]) -> list[str]:
    """Settings that differ from the baseline's: those rows compare unlike measurements."""
    base = results[0].settings
    return [k for k in FAIR_SETTINGS if any(r.settings.get(k) != base.get(k) for r in results[1:])]


@dataclass
class Comparison:
    labels: list[str]
    results: list[EvalResult]
    speed_ab: dict | None = None   # an interleaved A/B timing of these models (evaluate/ab_speed.py)

    def __post_init__(self):
        if len(self.labels) != len(self.results) or not self.results:
            raise MiOptError("compare needs one label per result and at least one result")
        if self.speed_ab:
            from mi_opt.evaluate.ab_speed import apply_ab

            apply_ab(self.results, self.labels, self.speed_ab)
        self.rows = metrics_table(self.results, self.labels, self.speed_ab)

    def _cells(self) -> list[list[str]]:
        table = []
        for m in self.rows:
            cells = [m.name]
            for i, v in enumerate(m.values):
                text = "n/a" if v is None else m.fmt.format(v) + _interval_text(m.interval(i))
                if i > 0 and v is not None:
                    text += " " + _relation_text(m, i)
                cells.append(text)
            table.append(cells)
        return table

    def notes(self) -> list[str]:
        notes = ["first column is the baseline; (+x) = change, (xN) = speedup for latencies, "
                 "ratio for throughput, memory and size",
                 f"[low, high] = {LEVEL:.0%} interval; * = significant change (p < {1 - LEVEL:.2f}) by a paired test on "
                 "the same items (McNemar for right/wrong scores, paired bootstrap otherwise; perplexity: paired "
                 "over windows); a change without * is within the noise"]
        if self.speed_ab:
            notes.append("speed rows: [low, high] = interquartile range over rounds; * = the per-round ratios' "
                         "IQR excludes x1.00, no check found the machine busy, and that speedup was steady "
                         "across rounds")
        unpaired = sorted({c["reason"] for m in self.rows for c in (m.changes or []) if c and "reason" in c})
        if unpaired:
            notes.append(f"no paired test for some rows: {'; '.join(unpaired)}")
        differ = unfair_settings(self.results)
        if differ:
            notes.append(f"settings differ from the baseline's: {', '.join(differ)}; those rows are not comparable")
        timed = [lb for lb, r in zip(self.labels, self.results) if r.speed]
        if self.speed_ab:
            from mi_opt.evaluate.ab_speed import summary_lines

            notes += [line.replace("**", "") for line in summary_lines(self.speed_ab)]
            alone = [lb for lb in timed if lb not in self.speed_ab["per_model"]]
            if alone:
                notes.append(f"speed of {', '.join(alone)} was timed on its own, not in the A/B rounds")
        elif len(timed) > 1:
            notes.append("speed rows were timed in separate runs, not interleaved A/B: a speedup below about "
                         "x1.2 may be the machine, not the model (time them together: `mi-opt compare` on models)")
        kinds = {(r.speed or {}).get("size_kind") for r in self.results} - {None}
        if len(kinds) > 1:
            notes.append("size mixes bytes on disk and bytes in memory")
        if size_in_memory(self.results):
            notes.append("size MB: the weights' bytes in memory, in the dtype they were loaded in"
                         + ("; size on disk MB: the weight files (a checkpoint may store another dtype)"
                            if any(m.name == "size on disk MB" for m in self.rows) else ""))
        return notes

    def to_text(self) -> str:
        header = ["metric"] + self.labels
        table = [header] + self._cells()
        widths = [max(len(row[c]) for row in table) for c in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
                 for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [""] + [f"note: {n}" for n in self.notes()])

    def to_markdown(self) -> str:
        header = ["metric"] + self.labels
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(self.labels)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self._cells()]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes()]) + "\n"

    def to_dict(self) -> dict:
        rows = [{"metric": m.name, "higher_is_better": m.higher_is_better, "relation": m.kind,
                 "values": dict(zip(self.labels, m.values)),
                 "intervals": {label: m.interval(i) for i, label in enumerate(self.labels)},
                 "vs_baseline": {label: m.relation(i) for i, label in enumerate(self.labels) if i > 0},
                 "paired": {label: m.change(i) for i, label in enumerate(self.labels) if i > 0}}
                for m in self.rows]
        return {"schema": SCHEMA, "version": VERSION, "labels": self.labels, "baseline": self.labels[0],
                "rows": rows, "notes": self.notes(), "speed_ab": self.speed_ab,
                "models": {label: r.model for label, r in zip(self.labels, self.results)},
                "versions": versions(), "created": now()}

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        out_dir = Path(out_dir)
        paths = {"markdown": atomic_write_bytes(out_dir / "compare.md", self.to_markdown().encode()),
                 "json": write_json(out_dir / "compare.json", self.to_dict())}
        paths["plot"] = pareto_plot(self.labels, self.results, out_dir / "pareto.png")
        return paths


def pareto_plot(labels: list[str], results: list[EvalResult], path: str | Path) -> Path:
    """Accuracy (task mean, else -perplexity) against decode latency and against size."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    use_tasks = all(r.task_mean() is not None for r in results)
    acc = [r.task_mean() if use_tasks else (r.perplexity or {}).get("perplexity") for r in results]
    y_bars = [(task_mean_score(r) or {}).get("interval") if use_tasks else (r.perplexity or {}).get("interval")
              for r in results]
    y_label = "task mean (higher is better)" if use_tasks else "perplexity (lower is better)"
    decode_bars = [[_speed(r, "decode_ms_per_token", "q1"), _speed(r, "decode_ms_per_token", "q3")] for r in results]
    axes_spec = [("decode ms per token (lower is better)", [_speed(r, "decode_ms_per_token") for r in results],
                  decode_bars),
                 ("size MB (lower is better)", [_mb(_speed(r, "size_bytes")) for r in results], [None] * len(results))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (x_label, xs, x_bars) in zip(axes, axes_spec):
        points = [(x, y, label, xb, yb) for x, y, label, xb, yb in zip(xs, acc, labels, x_bars, y_bars)
                  if x is not None and y is not None]
        for x, y, label, xb, yb in points:
            # Error bars: the score's 95% interval, the timing's interquartile range across rounds.
            ax.errorbar([x], [y], yerr=_bar(y, yb), xerr=_bar(x, xb), fmt="none", ecolor="grey",
                        elinewidth=1, capsize=3, zorder=2)
            ax.scatter([x], [y], s=60, marker="*" if label == labels[0] else "o", zorder=3)
        for x, y, label, _, _ in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
        front = _front([(p[0], p[1]) for p in points], higher_is_better=use_tasks)
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="grey", linewidth=1, zorder=2, label="Pareto front")
            ax.legend(loc="best", fontsize=8)
        if not points:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    fig.suptitle("accuracy vs cost (baseline: star; bars: 95% interval of the score, IQR of the timing)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _bar(value: float, interval: list | None):
    """matplotlib's [[below], [above]] error extent for an interval around value, or None."""
    if not interval or None in interval:
        return None
    return [[max(0.0, value - interval[0])], [max(0.0, interval[1] - value)]]


def _front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """Points no other point beats on both cost (lower) and accuracy, sorted by cost."""
    sign = 1 if higher_is_better else -1
    best, front = None, []
    for x, y in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if best is None or sign * y > best:
            front.append((x, y))
            best = sign * y
    return front
