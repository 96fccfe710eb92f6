"""What the A/B timing's busy-machine checks read on this machine, idle and with competitors.

    python benchmarks/busy_machine.py            # about a minute; run nothing else meanwhile

Times the calibration kernel (the one `mi-opt run` times before and after its A/B rounds) in
back-to-back calls, each with its own 0.5 s warm-up as in the harness, and reads who used the
CPUs during each call (mi_opt.evaluate.cpu_load): first idle, then with one and with two
busy-loop processes competing. The idle rows are what the limits in
mi_opt.evaluate.ab_speed.Reliability must not flag; the competitor rows, what they must.
Writes reports/busy_machine.md and reports/busy_machine.json.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from mi_opt.artifacts import machine, versions, write_json
from mi_opt.evaluate.ab_speed import KERNEL_WARMUP_S, CalibrationKernel, Reliability, kernel_drift
from mi_opt.evaluate.cpu_load import shares, snapshot
from mi_opt.evaluate.speed import median_spread

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"


def kernel_call(kernel: CalibrationKernel) -> dict:
    """One call as the harness makes it: warm-up, 15 timed reps; with the CPU shares of the reps."""
    start = snapshot()
    times = kernel.times(warmup_s=KERNEL_WARMUP_S)
    cpu = shares(start, snapshot())
    s = median_spread([t * 1e3 for t in times])
    return {"median_ms": s["median"], "spread": (s["q3"] - s["q1"]) / s["median"], "reps_s": times,
            "others": cpu.others if cpu else None, "steal": cpu.steal if cpu else None}


def condition(kernel: CalibrationKernel, competitors: int, calls: int) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(competitors)]
    try:
        if procs:
            time.sleep(1.0)
        return [kernel_call(kernel) for _ in range(calls)]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def render(data: dict) -> str:
    limits = data["limits"]
    lines = ["# The busy-machine checks, measured", "",
             f"`python benchmarks/busy_machine.py`, {data['machine'].get('cpu_count', '?')} CPUs, "
             f"{data['threads']} torch threads; calibration kernel {data['kernel']['size']}x{data['kernel']['size']}, "
             f"{data['kernel']['steps']} steps per rep, 15 reps per call after a 0.5 s warm-up, "
             f"{data['calls']} back-to-back calls per condition.", "",
             "| condition | kernel median per call (ms) | reps' spread (IQR / median) | largest drift between calls "
             "| other processes' CPU share | steal |",
             "|---|---|---|---:|---|---|"]
    for name, calls in data["conditions"].items():
        medians = ", ".join(f"{c['median_ms']:.1f}" for c in calls)
        spreads = f"{min(c['spread'] for c in calls):.2f}-{max(c['spread'] for c in calls):.2f}"
        others = [c["others"] for c in calls if c["others"] is not None]
        steal = [c["steal"] for c in calls if c["steal"] is not None]
        share = f"{min(others):.2f}-{max(others):.2f}" if others else "n/a"
        stolen = f"{max(steal):.2f}" if steal else "n/a"
        lines.append(f"| {name} | {medians} | {spreads} | {data['drift'][name]:.0%} | {share} | {stolen} |")
    lines += ["", f"Limits in `Reliability`: kernel spread {limits['kernel_spread_limit']:.0%}, drift between "
              f"phases {limits['drift_limit']:.0%}, other processes {limits['others_limit']:.0%}, steal "
              f"{limits['steal_limit']:.0%}. Drift is the slower call's median over the faster's, minus 1, "
              "counted only when their interquartile ranges do not overlap (as the harness counts it).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernel = CalibrationKernel.sized()
    conditions = {"idle": condition(kernel, 0, args.calls),
                  "one busy loop": condition(kernel, 1, args.calls),
                  "two busy loops": condition(kernel, 2, args.calls)}
    drift = {name: max(abs(kernel_drift(a["reps_s"], b["reps_s"])) for a in calls for b in calls)
             for name, calls in conditions.items()}
    data = {"schema": "mi-opt/busy-machine", "version": 1, "threads": args.threads, "calls": args.calls,
            "kernel": {"size": kernel.size, "steps": kernel.steps}, "conditions": conditions, "drift": drift,
            "limits": vars(Reliability()), "machine": machine(), "versions": versions()}
    REPORTS.mkdir(exist_ok=True)
    write_json(REPORTS / "busy_machine.json", data)
    (REPORTS / "busy_machine.md").write_text(render(data))
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
