"""Leftovers of killed writers are removed by the next writer; a live owner's are never touched."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

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


def _legacy(parent, name: str, hours_old: float):
    """A temporary as versions before pid-named ones left it (mkdtemp's 8 random characters)."""
    path = parent / name
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"x" * 100)
    stamp = time.time() - hours_old * 3600
    os.utime(path, (stamp, stamp))
    return path


def test_unowned_leftovers_of_older_versions_go_once_an_hour_old(tmp_path):
    _legacy(tmp_path, ".checkpoint.tmp-a1b2_c3d", hours_old=2)
    _legacy(tmp_path, ".smollm2-135m-zz9y8x7w", hours_old=2)   # ignored here: another output's
    _legacy(tmp_path, ".checkpoint.tmp-young123", hours_old=0.5)  # an older process may still write it
    _legacy(tmp_path, ".checkpoint-backup-1", hours_old=2)     # not mkdtemp's shape: not ours
    tmpfiles.remove_leftovers(tmp_path, "checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint-backup-1", ".checkpoint.tmp-young123",
                                                          ".smollm2-135m-zz9y8x7w"]
    tmpfiles.remove_leftovers(tmp_path, "smollm2-135m")
    assert not (tmp_path / ".smollm2-135m-zz9y8x7w").exists()


def test_an_unowned_old_checkpoint_of_an_older_version_is_put_back(tmp_path):
    _legacy(tmp_path, ".checkpoint.old-q9w8e7r6", hours_old=2)
    tmpfiles.remove_leftovers(tmp_path, "checkpoint")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_the_next_export_and_conversion_remove_older_versions_leftovers(tmp_path):
    from tiny import tiny_model

    from mi_opt.export import export
    from mi_opt.models import convert_gguf
    from mi_opt.plan import CompressionPlan

    _legacy(tmp_path, ".out.tmp-k2j3h4g5", hours_old=2)
    model = tiny_model()
    export(model, None, CompressionPlan(model={"spec": "tiny", "n_layers": 4}, predicted={}), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    _legacy(models, ".smollm2-135m-m5n6b7v8", hours_old=2)
    with pytest.raises(OSError):  # no such GGUF: the conversion fails after clearing what was left
        convert_gguf(tmp_path / "missing.gguf", models / "smollm2-135m")
    assert list(models.iterdir()) == []
