"""Speed measured A/B: the original and each compressed model timed in the same process, in
interleaved rounds, so a speedup is never a comparison with numbers taken at another moment.

Each round times every model once, the order rotated from round to round (no model is always
first, or always right after another's caches); after untimed warm-up runs of each. A speedup is
the median of per-round ratios (base / model in the same round), with its interquartile range.
Whether the machine was busy is judged three ways, and any of them puts a warning in words
beside the numbers: the CPU time other processes (and the hypervisor) took during the rounds,
read from the kernel's counters (cpu_load); a fixed calibration kernel (reps of a few tens of
ms, sized once for this machine) timed before and after the rounds, whose reps vary or whose
level moves far; and the load average.

The limits come from benchmarks/busy_machine.py (reports/busy_machine.md) on the 2-vCPU machine
this was built on. Idle (other processes' share 0.00-0.01), six back-to-back kernel calls gave
medians drifting by up to 23% between calls (37% in an earlier run of the script), with one
call's reps spread by up to 0.10 (0.41 earlier; interquartile range / median): the virtual
machine steps its speed between windows of a second, and a 15% drift limit flagged every idle
quickstart. One or two competing busy loops made the kernel 2-10x slower, its reps spread
0.25-1.53, and others' share 0.35-0.51. So the CPU counters are the sharp test where the system
has them, and the kernel's limits sit above what an idle machine gives.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mi_opt.artifacts import now
from mi_opt.errors import MiOptError
from mi_opt.evaluate.config import SpeedConfig
from mi_opt.evaluate.cpu_load import CpuShares, cpu_count, shares, snapshot
from mi_opt.evaluate.speed import (TIMING_KEYS, forward_kwargs, median_spread, speed_prompt, sync_device,
                                   timed_generation, timing_summaries)

SCHEMA = "mi-opt/speed-ab"
# 2: other processes' CPU share, kernel limits from measurements; 3: judged by ratio spreads;
# 4: a machine verdict and each speedup's own (machine_reliable, unsteady), row by row in compare
VERSION = 4
# Ratio rows: metric -> (name of the ratio, True when a larger raw value is faster).
TIMED_PARTS = ("prefill", "time to first token", "decode")  # the order of timed_generation's results
RATIOS = {"prefill_ms": ("prefill speedup", False), "ttft_ms": ("time to first token speedup", False),
          "decode_tokens_per_s": ("decode speedup", True), "decode_ms_per_token": ("decode speedup", False)}


@dataclass
class Reliability:
    """When timings are not to be trusted. Spreads are interquartile range / median."""

    spread_limit: float = 0.15          # a model's own round-to-round spread
    kernel_spread_limit: float = 0.5    # the kernel's reps within one phase (idle: up to 0.41)
    drift_limit: float = 0.5            # kernel median after the rounds vs before (idle: up to 0.37)
    others_limit: float = 0.10          # other processes' share of the machine's CPU time
    steal_limit: float = 0.10           # the hypervisor's share (time given to other machines)
    load_margin: float = 0.5            # load average above (CPUs + margin): other work is running


def warm_up(runners: dict[str, Callable[[], object]], times: int) -> None:
    """Call every runner `times` times, untimed (first-call costs: allocator, caches, lazy init)."""
    for runner in runners.values():
        for _ in range(times):
            runner()


def interleaved(runners: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                progress: bool = False) -> tuple[dict[str, list], list[list[str]]]:
    """({label: [result of each timed call]}, order of the labels in each round).

    Every runner is called `warmup` times untimed first; round r starts at label r mod n.
    """
    labels = list(runners)
    if not labels or rounds < 1:
        raise MiOptError(f"an A/B timing needs at least one model and one round (got {len(labels)}, {rounds})")
    warm_up(runners, warmup)
    out, order = {label: [] for label in labels}, []
    for r in tqdm(range(rounds), desc="speed A/B", unit="round", disable=not progress):
        turn = labels[r % len(labels):] + labels[:r % len(labels)]
        order.append(turn)
        for label in turn:
            out[label].append(runners[label]())
    return out, order


# The kernel's size: each rep must last a few tens of milliseconds, or timer resolution, scheduler
# ticks and CPU frequency steps (each a millisecond or more) are a large share of it and an idle
# machine reads as a busy one. Steps are chosen once, before the rounds, and reused after them,
# so before and after time exactly the same work.
KERNEL_SIZE = 256
KERNEL_TARGET_S = 0.03
KERNEL_REPS = 15
KERNEL_MAX_STEPS = 2000
KERNEL_WARMUP_S = 0.5   # untimed reps first, for at least this long: caches, allocator, clock ramp-up


@dataclass(frozen=True)
class CalibrationKernel:
    """A fixed matrix-multiply loop: the same work every time, so a change in its time is a
    change in the machine, not in a model."""

    steps: int = 20
    size: int = KERNEL_SIZE
    device: str = "cpu"

    def rep(self, a: torch.Tensor) -> float:
        """Seconds of one rep."""
        device = a.device
        sync_device(device)
        t0 = time.perf_counter()
        b = a
        for _ in range(self.steps):
            b = torch.tanh(b @ a * (1.0 / self.size))
        sync_device(device)
        return time.perf_counter() - t0

    def matrix(self) -> torch.Tensor:
        return torch.randn(self.size, self.size, generator=torch.Generator().manual_seed(0)).to(self.device)

    def times(self, reps: int = KERNEL_REPS, warmup: int = 2, warmup_s: float = 0.0) -> list[float]:
        """Seconds per rep, after untimed reps (caches, CPU frequency ramping up): at least
        `warmup` of them, and more until `warmup_s` seconds have passed."""
        a = self.matrix()
        with torch.inference_mode():
            started, done = time.perf_counter(), 0
            while done < warmup or time.perf_counter() - started < warmup_s:
                self.rep(a)
                done += 1
            return [self.rep(a) for _ in range(reps)]

    @classmethod
    def sized(cls, target_s: float = KERNEL_TARGET_S, device: torch.device | str = "cpu") -> "CalibrationKernel":
        """A kernel whose reps last about target_s on this machine, at the current thread count."""
        probe = cls(steps=20, device=str(device))
        # The fastest probe rep: a rep slowed by another process would size the kernel too short.
        per_step = min(probe.times(reps=3, warmup=1)) / probe.steps
        return cls(steps=steps_for(target_s, per_step), device=str(device))


def steps_for(target_s: float, per_step_s: float, max_steps: int = KERNEL_MAX_STEPS) -> int:
    """Inner steps so that a rep lasts about target_s, given one step's measured seconds."""
    if per_step_s <= 0:
        return max_steps
    return max(1, min(max_steps, round(target_s / per_step_s)))


@dataclass
class TimedRounds:
    """What one A/B pass recorded: each runner's results per round, the order of each round,
    the calibration kernel's seconds per rep before and after the rounds, and who used the CPUs
    during the rounds (None where the system does not say)."""

    runs: dict[str, list]
    order: list[list[str]]
    kernel_before: list[float]
    kernel_after: list[float]
    kernel: CalibrationKernel
    cpu: CpuShares | None = None


def timed_rounds(runners: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, progress: bool = False,
                 device: torch.device | str = "cpu", kernel: CalibrationKernel | None = None) -> TimedRounds:
    """Warm-up runs of every runner, the calibration kernel, the interleaved rounds, the kernel again.

    The kernel is sized (unless given) and first timed after the warm-up runs, at the current
    thread count: before and after then see the process in the same state, and a difference
    between them is the machine's load changing, not the first calls' costs.
    """
    warm_up(runners, warmup)
    kernel = kernel or CalibrationKernel.sized(device=device)
    before = kernel.times(warmup_s=KERNEL_WARMUP_S)
    start = snapshot()
    runs, order = interleaved(runners, rounds, warmup=0, progress=progress)
    cpu = shares(start, snapshot())
    after = kernel.times(warmup_s=KERNEL_WARMUP_S)
    return TimedRounds(runs, order, before, after, kernel, cpu)


def _spread(values: list[float]) -> float:
    s = median_spread(values)
    return (s["q3"] - s["q1"]) / s["median"] if s["median"] else 0.0


def kernel_drift(before: list[float], after: list[float]) -> float:
    """How much slower the slower phase ran: its median over the other's, minus 1; positive when
    the slower phase is after the rounds, negative when it is before (so a competitor that starts
    and one that stops weigh the same). 0.0 when the two phases' interquartile ranges overlap,
    since a shift inside either phase's own noise is no evidence that the machine changed."""
    b, a = median_spread(before), median_spread(after)
    if a["q1"] <= b["q3"] and b["q1"] <= a["q3"]:
        return 0.0
    return a["median"] / b["median"] - 1 if a["median"] >= b["median"] else -(b["median"] / a["median"] - 1)


def machine_warnings(kernel_before: list[float], kernel_after: list[float], load: tuple[float, int] | None = None,
                     limits: Reliability | None = None, cpu: CpuShares | None = None) -> list[str]:
    """Sentences saying why the machine was not fit for timing; none when no check fired.

    kernel_before / kernel_after: calibration kernel seconds per rep; load: (1-minute load average,
    CPU count) after the rounds; cpu: who used the CPUs during the rounds.
    """
    limits = limits or Reliability()
    out = []
    if cpu is not None and cpu.others > limits.others_limit:
        out.append(f"other processes used {cpu.others:.0%} of the machine's CPU time while models were timed")
    if cpu is not None and cpu.steal > limits.steal_limit:
        out.append(f"the hypervisor gave {cpu.steal:.0%} of this machine's CPU time to other machines (steal) "
                   "while models were timed")
    drift = kernel_drift(kernel_before, kernel_after)
    if abs(drift) > limits.drift_limit:
        slower, other = ("after", "before") if drift > 0 else ("before", "after")
        out.append(f"the calibration kernel ran {abs(drift):.0%} slower {slower} the timing rounds than {other}: "
                   "the machine's load changed while models were timed")
    # Each phase's own spread: a clean step between before and after is the drift above, not noise.
    spread = max(_spread(kernel_before), _spread(kernel_after))
    if spread > limits.kernel_spread_limit:
        out.append(f"the calibration kernel's own times vary by {spread:.0%} (interquartile range / median): "
                   "other work is competing for this machine")
    if load is not None and load[0] > load[1] + limits.load_margin:
        out.append(f"the load average was {load[0]:.1f} on {load[1]} CPUs: other processes were running")
    return out


def reliability_warnings(kernel_before: list[float], kernel_after: list[float],
                         model_times: dict[str, list[float] | dict[str, list[float]]],
                         load: tuple[float, int] | None = None, limits: Reliability | None = None,
                         cpu: CpuShares | None = None) -> list[str]:
    """Why timings without a baseline in their rounds are unreliable: the machine's checks, and
    each model's own times varying across rounds (model_times: label -> seconds of each round, per
    part timed, {"prefill": [...], "decode": [...]}; a bare list is decode). An A/B with a
    baseline judges its speedups by their per-round ratios instead (ab_result)."""
    return machine_warnings(kernel_before, kernel_after, load, limits, cpu) + spread_notes(model_times, limits)


def unsteady_speedups(ratios: dict[str, dict[str, list[float]]], limits: Reliability | None = None
                      ) -> dict[str, dict[str, str]]:
    """label -> timing key -> a sentence, for each speedup whose per-round ratios vary beyond the
    spread limit. Decode's two keys (tokens/s, ms/token) are one ratio: judged once, marked both."""
    limits = limits or Reliability()
    out = {}
    for label, keys in ratios.items():
        for key, per_round in keys.items():
            s = _spread(per_round)
            if key != "decode_ms_per_token" and s > limits.spread_limit:
                flagged = out.setdefault(label, {})
                flagged[key] = f"{label}'s {RATIOS[key][0]} varies by {s:.0%} across rounds"
                if key == "decode_tokens_per_s":
                    flagged["decode_ms_per_token"] = flagged[key]
    return out


def spread_notes(model_times: dict[str, list[float] | dict[str, list[float]]],
                 limits: Reliability | None = None) -> list[str]:
    """One sentence per model and part whose times vary across rounds beyond the spread limit."""
    limits = limits or Reliability()
    out = []
    for label, parts in model_times.items():
        for part, times in (parts if isinstance(parts, dict) else {"decode": parts}).items():
            s = _spread(times)
            if s > limits.spread_limit:
                out.append(f"{label}'s {part} times vary by {s:.0%} across rounds")
    return out


def _per_round_ratios(base: list[float], other: list[float], higher_is_faster: bool) -> list[float]:
    return [(o / b if higher_is_faster else b / o) for b, o in zip(base, other)]


def measure_ab(models: dict[str, nn.Module | object], config: SpeedConfig | None = None,
               device: str | torch.device | None = None, progress: bool = True,
               limits: Reliability | None = None, threads: int | None = None,
               states: dict[str, Callable[[], AbstractContextManager]] | None = None) -> dict:
    """Time every model (the first is the baseline) in interleaved rounds; see the module doc.

    config.repetitions is the number of rounds and config.warmup the untimed runs per model.
    states: label -> a context entered around each of that label's runs (never inside the timed
    region), for a label that is another label's model in another state: the healed model with
    its LoRA adapters set aside is the compressed model, and one copy in memory serves both.
    Returns the speed-ab artifact: per-model timing summaries, per-round ratios vs the baseline,
    the calibration kernel's times, and `warnings` in words (empty when the timings look sound).
    """
    from mi_opt.handle import bare

    config = config or SpeedConfig()
    models = {label: bare(m) for label, m in models.items()}  # bare models or handles
    labels = list(models)
    states = states or {}
    unknown = sorted(set(states) - set(labels))
    if unknown:
        raise MiOptError(f"an A/B timing got states for {', '.join(unknown)}, which it does not time")
    prompts = {label: speed_prompt(m, config, device) for label, m in models.items()}
    extras = {label: forward_kwargs(m) for label, m in models.items()}
    kernel_device = prompts[labels[0]][0]

    def runner(label: str) -> Callable[[], tuple[float, float, float]]:
        state = states.get(label, nullcontext)

        def run() -> tuple[float, float, float]:
            with state():
                return timed_generation(models[label], prompts[label][1], config.new_tokens, extras[label])
        return run

    from mi_opt.evaluate import torch_threads  # the same thread setting as evaluate(), restored after

    with torch.inference_mode(), torch_threads(threads):
        timed = timed_rounds({label: runner(label) for label in labels}, config.repetitions, config.warmup,
                             progress, device=kernel_device)
        ab = ab_result(labels, timed.runs, timed.order, config, timed.kernel_before, timed.kernel_after,
                       load_average(), limits, str(kernel_device), timed.cpu)
        ab["calibration_kernel"] = {"size": timed.kernel.size, "steps": timed.kernel.steps,
                                    "reps": len(timed.kernel_before), "timed": "after the warm-up runs"}
        return ab


def load_average() -> tuple[float, int] | None:
    """(1-minute load average, CPUs this process may use), or None where the system has none."""
    return (os.getloadavg()[0], cpu_count()) if hasattr(os, "getloadavg") else None


def ab_result(labels: list[str], runs: dict[str, list[tuple[float, float, float]]], order: list[list[str]],
              config: SpeedConfig, kernel_before: list[float], kernel_after: list[float],
              load: tuple[float, int] | None = None, limits: Reliability | None = None, device: str = "cpu",
              cpu: CpuShares | None = None) -> dict:
    """The speed-ab artifact from recorded timings (runs: label -> (prefill, ttft, decode) s per round)."""
    per_model = {label: timing_summaries(runs[label], config) for label in labels}
    raw = {label: {key: [_per_round(t, key, config) for t in runs[label]] for key in TIMING_KEYS} for label in labels}
    base = labels[0]
    per_round = {label: {key: _per_round_ratios(raw[base][key], raw[label][key], RATIOS[key][1])
                         for key in TIMING_KEYS} for label in labels[1:]}
    ratios = {label: {key: median_spread(v) for key, v in keys.items()} for label, keys in per_round.items()}
    # Every part timed: a prefill of a few hundred ms moves with the machine's speed steps more
    # than 31 decode steps do.
    parts = {lb: {part: [t[i] for t in runs[lb]] for i, part in enumerate(TIMED_PARTS)} for lb in labels}
    # A/B (a baseline in the rounds): the machine's checks hold for every row, a speedup's own
    # spread for its row only (compare withholds significance row by row).
    ab = len(labels) > 1
    machine = machine_warnings(kernel_before, kernel_after, load, limits, cpu) if ab else \
        reliability_warnings(kernel_before, kernel_after, parts, load, limits, cpu)
    unsteady = unsteady_speedups(per_round, limits)
    warnings = machine + [sentence for keys in unsteady.values() for sentence in dict.fromkeys(keys.values())]
    notes = spread_notes(parts, limits) if ab else []
    return {"schema": SCHEMA, "version": VERSION, "labels": labels, "baseline": base, "rounds": len(order),
            "warmup": config.warmup, "order": order, "threads": torch.get_num_threads(), "device": device,
            "settings": {"batch_size": config.batch_size, "prompt_len": config.prompt_len,
                         "new_tokens": config.new_tokens, "seed": config.seed},
            "per_model": per_model, "vs_baseline": ratios,
            "calibration_kernel_ms": {"before": median_spread([t * 1e3 for t in kernel_before]),
                                      "after": median_spread([t * 1e3 for t in kernel_after])},
            "load_average": load[0] if load else None, "cpus": load[1] if load else None,
            "cpu_shares": asdict(cpu) if cpu else None,
            "reliable": not warnings, "warnings": warnings, "machine_reliable": not machine,
            "machine_warnings": machine,
            "unsteady": {label: sorted(keys) for label, keys in unsteady.items()}, "spread_notes": notes,
            "created": now()}


def _per_round(timing: tuple[float, float, float], key: str, config: SpeedConfig) -> float:
    prefill, ttft, decode = timing
    if key == "prefill_ms":
        return prefill * 1e3
    if key == "ttft_ms":
        return ttft * 1e3
    if key == "decode_tokens_per_s":
        return config.batch_size * (config.new_tokens - 1) / decode
    return decode * 1e3 / (config.new_tokens - 1)


def apply_ab(results: list, labels: list[str], ab: dict) -> None:
    """Replace the timing figures of each EvalResult with its A/B figures (memory and size stay)."""
    for label, result in zip(labels, results):
        if label in ab["per_model"] and result.speed is not None:
            result.speed.update(ab["per_model"][label])
            result.speed["timing"] = "interleaved A/B"


def shared_timing(ab: dict, label: str, like: str, why: str) -> dict:
    """A copy of `ab` in which `label` shows `like`'s figures: a model with exactly `like`'s
    modules and shapes does the same work, so timing it again would measure only the machine.
    why: what makes them alike, in words (the report says it)."""
    if like not in ab["per_model"] or like == ab["baseline"]:
        raise MiOptError(f"{label} can share the timing of a timed model other than the baseline, not {like!r}")
    shared = {**ab, "per_model": {**ab["per_model"], label: ab["per_model"][like]},
              "vs_baseline": {**ab["vs_baseline"], label: ab["vs_baseline"][like]},
              "shared": {**ab.get("shared", {}), label: {"like": like, "why": why}}}
    if "unsteady" in ab:  # the same rounds' figures, so the same verdict on each of them
        shared["unsteady"] = {**ab["unsteady"], label: ab["unsteady"].get(like, [])}
    return shared


def summary_lines(ab: dict) -> list[str]:
    """Report sentences: how the timing was done, which model shares another's figures, and any
    reliability warning."""
    lines = [f"Speed: {', '.join(ab['labels'])} timed in the same process, {ab['rounds']} interleaved rounds "
             f"after {ab['warmup']} warm-up run(s) each, {ab['threads']} thread(s) on {ab['device']}; "
             "speedups are medians of per-round ratios, [low, high] their interquartile range."]
    for label, view in ab.get("views", {}).items():
        lines.append(f"{label} was timed as {view}.")
    for label, shared in ab.get("shared", {}).items():
        lines.append(f"{label} has {shared['why']}: it shares {shared['like']}'s shapes and speed, and shows "
                     f"{shared['like']}'s timing from these rounds.")
    if ab.get("spread_notes"):
        cpu = ab.get("cpu_shares")
        idle = bool(cpu) and cpu["others"] <= Reliability().others_limit
        lines.append("Raw times moved between rounds (" + "; ".join(ab["spread_notes"]) + ")"
                     + (f", with other processes at {cpu['others']:.0%} of the CPU time: this "
                        "machine's own speed varied" if idle else "")
                     + ". Each round times every model, so the speedups, per-round ratios, hold within the "
                     "ranges shown.")
    warning = warning_line(ab)
    return lines + ([warning] if warning else [])


def warning_line(ab: dict) -> str | None:
    """The reliability warning as one sentence, or None when the timing looks sound."""
    if not ab["warnings"]:
        return None
    if _machine_busy(ab):
        return ("**Timing unreliable:** " + "; ".join(ab["warnings"]) + ". Rerun on an idle machine "
                "before trusting the speed rows.")
    cpu = ab.get("cpu_shares")
    idle = f" (other processes took {cpu['others']:.0%} of the CPU time)" if cpu else ""
    return ("**Some speedups unsteady:** " + "; ".join(ab["warnings"]) + f". No check found the machine busy{idle}: "
            "this is its own speed moving between runs. Those rows get no significance mark; more rounds "
            "(`evaluate.speed.repetitions`) narrow their ranges.")


def _machine_busy(ab: dict) -> bool:
    """Whether a machine check fired; artifacts before the separate verdicts count every warning."""
    if "machine_warnings" in ab:
        return bool(ab["machine_warnings"])
    return not ab["machine_reliable"] if "machine_reliable" in ab else bool(ab["warnings"])


def merge_runs(base_label: str, runs: dict[str, dict]) -> dict | None:
    """One A/B view of several runs' speed_ab results: label -> that run's A/B of (original, model).

    Each ratio still comes from its own rounds (the original timed beside that model); the
    original's figures shown are the first run's. None when any run lacks an A/B timing.
    """
    if not runs or any(ab is None for ab in runs.values()):
        return None
    first = next(iter(runs.values()))
    merged = {**first, "labels": [base_label, *runs], "baseline": base_label,
              "per_model": {base_label: first["per_model"][first["baseline"]]}, "vs_baseline": {}, "warnings": [],
              "spread_notes": []}
    for label, ab in runs.items():
        model = ab["labels"][1]
        merged["per_model"][label] = ab["per_model"][model]
        merged["vs_baseline"][label] = ab["vs_baseline"][model]
        merged["warnings"] += [f"{label}: {w}" for w in ab["warnings"]]
        merged["spread_notes"] += [f"{label}: {n}" for n in ab.get("spread_notes", [])]
    merged["reliable"] = not merged["warnings"]
    # Row by row, each label is judged by its own run: a busy machine during one run withholds
    # that label's significance only. Runs from before version 4 leave the whole-table verdict.
    for key in ("machine_reliable", "machine_warnings", "unsteady"):
        merged.pop(key, None)
    if all("unsteady" in ab for ab in runs.values()):
        merged["machine_reliable"] = True
        merged["machine_warnings"] = [f"{label}: {w}" for label, ab in runs.items() for w in ab["machine_warnings"]]
        merged["unsteady"] = {label: list(TIMING_KEYS) if not ab["machine_reliable"]
                              else ab["unsteady"].get(ab["labels"][1], []) for label, ab in runs.items()}
    # the busiest run's shares: "the machine was otherwise idle" must hold for every run
    shares_seen = [ab["cpu_shares"] for ab in runs.values() if ab.get("cpu_shares")]
    merged["cpu_shares"] = max(shares_seen, key=lambda c: c["others"]) if len(shares_seen) == len(runs) else None
    merged["merged_from"] = list(runs)
    return merged
