"""Leftovers of killed writers are removed by the next writer; a live owner's are never touched."""
from __future__ import annotations

import os
import subprocess
import sys

from mi_opt import tmpfiles
from mi_opt.artifacts import write_json


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_writer_removes_dead_owners_leftovers_only(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".checkpoint.tmp-{dead}-abc").mkdir()
    (tmp_path / f".checkpoint.tmp-{dead}-abc" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / f".checkpoint.tmp-{os.getppid()}-live").mkdir()  # a running process's export
    (tmp_path / f".other.tmp-{dead}-abc").mkdir()  # another output's: its own writer cleans it
    tmp = tmpfiles.make_dir(tmp_path, "checkpoint")
    assert tmp.name.startswith(f".checkpoint.tmp-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [tmp.name, f".checkpoint.tmp-{os.getppid()}-live", f".other.tmp-{dead}-abc"])


def test_an_old_checkpoint_moved_aside_by_a_killed_force_export_is_put_back(tmp_path):
    old = tmp_path / f".checkpoint.old-{_dead_pid()}-xyz"
    old.mkdir()
    (old / "config.json").write_text("{}")
    tmpfiles.remove_leftovers(tmp_path, "checkpoint")
    assert (tmp_path / "checkpoint" / "config.json").exists() and not old.exists()


def test_json_files_leave_no_killed_temporary_and_follow_the_umask(tmp_path):
    (tmp_path / f".plan.json.tmp-{_dead_pid()}-q1w2").write_text("{half")
    before = os.umask(0o022)
    try:
        path = write_json(tmp_path / "plan.json", {"a": 1})
    finally:
        os.umask(before)
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    assert path.stat().st_mode & 0o777 == 0o644
