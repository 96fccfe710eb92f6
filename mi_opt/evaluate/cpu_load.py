"""Who used the CPUs while models were timed: this process, other processes, or the hypervisor.

The kernel's counters answer directly what a timing kernel can only infer: over a window,
the machine's busy time (/proc/stat) minus this process's own (/proc/self/stat, every thread)
is the time other processes ran, and "steal" is time the hypervisor gave to other machines.
A share of the machine's CPU time, so 0.0 on an idle machine whatever its CPU count; a competing
busy loop on a 2-CPU machine reads 0.35-0.5. Linux only: elsewhere the snapshots are None and the
kernel-timing checks in ab_speed stand alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
PROC_SELF_STAT = Path("/proc/self/stat")


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative clock ticks: every CPU's total, idle (with iowait), steal, and this process's own."""

    total: int
    idle: int
    steal: int
    own: int


@dataclass(frozen=True)
class CpuShares:
    """Shares of the machine's CPU time over a window (each 0..1)."""

    others: float
    steal: float
    own: float


def parse_snapshot(proc_stat: str, self_stat: str) -> CpuSnapshot:
    """A snapshot from the texts of /proc/stat and /proc/self/stat."""
    # "cpu  user nice system idle iowait irq softirq steal guest guest_nice": guest time is
    # already counted in user, so it is left out of the total.
    fields = [int(v) for v in proc_stat.splitlines()[0].split()[1:9]]
    # The process name (2nd field) may hold spaces: split after its closing parenthesis;
    # utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    after_name = self_stat.rsplit(")", 1)[1].split()
    return CpuSnapshot(total=sum(fields), idle=fields[3] + fields[4], steal=fields[7],
                       own=int(after_name[11]) + int(after_name[12]))


def snapshot() -> CpuSnapshot | None:
    """The counters now, or None where the system has no /proc (macOS, Windows)."""
    try:
        return parse_snapshot(PROC_STAT.read_text(), PROC_SELF_STAT.read_text())
    except (OSError, ValueError, IndexError):
        return None


def shares(before: CpuSnapshot | None, after: CpuSnapshot | None) -> CpuShares | None:
    """Shares of the window between two snapshots; None without both or for a window under a tick."""
    if before is None or after is None or after.total <= before.total:
        return None
    total = after.total - before.total
    steal = after.steal - before.steal
    own = after.own - before.own
    busy = total - (after.idle - before.idle) - steal
    # Ticks are sampled per CPU and per process at slightly different moments: clamp the small
    # negative values an idle machine can give.
    return CpuShares(others=max(0.0, (busy - own) / total), steal=max(0.0, steal / total),
                     own=min(1.0, max(0.0, own / total)))


def cpu_count() -> int:
    """CPUs this process may run on (its affinity), not every CPU of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
