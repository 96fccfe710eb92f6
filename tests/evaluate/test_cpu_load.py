"""Who used the CPUs: the counters parsed, shares computed, and a competing process seen live."""
import subprocess
import sys
import time

import pytest

from mi_opt.evaluate.ab_speed import reliability_warnings
from mi_opt.evaluate.cpu_load import CpuShares, CpuSnapshot, cpu_count, parse_snapshot, shares, snapshot

PROC_STAT = "cpu  47671 0 4231 50237 531 0 54 195 0 0\ncpu0 17778 0 1054 32448 56 0 13 99 0 0\n"
# A process name with a space and a parenthesis: the fields are counted after the last ")".
SELF_STAT = ("3169 (my (odd) name) R 3166 3166 1193 0 -1 4194304 97 0 0 0 812 40 0 0 20 0 1 0 51629 "
             "3133440 372")
STEADY = [0.0300, 0.0302, 0.0301, 0.0299, 0.0300, 0.0303, 0.0301]


def test_the_counters_are_read_from_the_proc_texts():
    snap = parse_snapshot(PROC_STAT, SELF_STAT)
    assert snap == CpuSnapshot(total=47671 + 4231 + 50237 + 531 + 54 + 195, idle=50237 + 531, steal=195,
                               own=812 + 40)


def test_shares_of_a_window():
    before = CpuSnapshot(total=1000, idle=500, steal=0, own=100)
    # 200 ticks on 2 CPUs: this process ran 150, another 40, 10 idle
    busy = shares(before, CpuSnapshot(total=1200, idle=510, steal=0, own=250))
    assert busy == pytest.approx(CpuShares(others=0.2, steal=0.0, own=0.75))
    # an idle machine's counters can put own a tick above busy: no negative share
    idle = shares(before, CpuSnapshot(total=1200, idle=500, steal=0, own=301))
    assert idle.others == 0.0 and idle.own == 1.0
    stolen = shares(before, CpuSnapshot(total=1200, idle=500, steal=30, own=270))
    assert stolen.steal == pytest.approx(0.15) and stolen.others == 0.0
    assert shares(None, before) is None and shares(before, before) is None


def test_other_processes_and_steal_are_reported_in_words():
    idle = CpuShares(others=0.01, steal=0.0, own=0.99)
    assert reliability_warnings(STEADY, STEADY, {"orig": [1.0, 1.0]}, cpu=idle) == []
    busy = reliability_warnings(STEADY, STEADY, {"orig": [1.0, 1.0]}, cpu=CpuShares(0.37, 0.0, 0.63))
    assert busy == ["other processes used 37% of the machine's CPU time while models were timed"]
    stolen = reliability_warnings(STEADY, STEADY, {}, cpu=CpuShares(0.0, 0.2, 0.8))
    assert len(stolen) == 1 and "steal" in stolen[0]


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.skipif(snapshot() is None, reason="the system has no /proc counters")
def test_a_competing_process_started_here_is_seen():
    # As many busy loops as this process may use CPUs: whatever else runs, they take a large share.
    competitors = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpu_count())]
    try:
        time.sleep(0.5)   # let them start
        before = snapshot()
        _spin(1.5)
        busy = shares(before, snapshot())
    finally:
        for p in competitors:
            p.kill()
            p.wait()
    assert busy.others > 0.3
    assert "other processes used" in reliability_warnings(STEADY, STEADY, {}, cpu=busy)[0]
