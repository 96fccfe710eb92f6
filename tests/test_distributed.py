"""Sharded profiling: 2 gloo ranks on CPU give the one-process profile; restarts reuse shards."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_model, tiny_windows

from mi_opt.distributed import (assign_units, is_distributed, load_shard, merge_shards, profile_distributed,
                                rank_info, rank_max_memory)
from mi_opt.errors import MiOptError
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.profile.importance import ImportanceProfile

WORKER = Path(__file__).parent / "dist_worker.py"
# Must match tests/dist_worker.py, which builds the same model, data and config on every rank.
CONFIG = AblationConfig(unit_kinds=("layer", "attn", "mlp", "head"), batch_size=4)


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def reference() -> ImportanceProfile:
    torch.set_num_threads(1)
    return profile_ablation(tiny_model("llama"), tiny_windows(8, 16), CONFIG, progress=False)


def assert_same_scores(a: ImportanceProfile, b: ImportanceProfile) -> None:
    assert list(a.scores) == list(b.scores)
    assert a.base_loss == pytest.approx(b.base_loss, abs=1e-6)
    for key in a.scores:
        for metric in ("delta_loss", "kl"):
            assert a.score(key, metric) == pytest.approx(b.score(key, metric), abs=1e-5), (key, metric)


def _env(rank: int, world: int, port: int) -> dict:
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--shards", str(tmp / "shards"), "--out", str(tmp / "profile.json"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def launch_by_hand(tmp: Path, *extra: str) -> list[subprocess.CompletedProcess]:
    """Two ranks without torchrun's agent, so a dead rank is not cleaned up for us."""
    port = _free_port()
    cmd = [sys.executable, str(WORKER), "--shards", str(tmp / "shards"), "--out", str(tmp / "profile.json"),
           *extra]
    procs = [subprocess.Popen(cmd, env=_env(r, 2, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out


def test_torchrun_two_ranks_equal_one_process_and_restart_reuses_shards(tmp_path, reference):
    run = torchrun(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    profile = ImportanceProfile.load(tmp_path / "profile.json")
    assert_same_scores(profile, reference)
    assert profile.cost["world_size"] == 2 and profile.cost["shards_reused"] == 0

    shards = sorted((tmp_path / "shards").glob("shard-*.json"))
    assert len(shards) == 2
    kept, deleted = shards
    kept_bytes = kept.read_bytes()
    deleted.unlink()
    run = torchrun(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    again = ImportanceProfile.load(tmp_path / "profile.json")
    assert again.cost["shards_reused"] == 1
    assert kept.read_bytes() == kept_bytes and deleted.is_file()
    assert_same_scores(again, reference)


def test_dead_rank_fails_clearly_and_keeps_finished_shards(tmp_path, reference):
    survivor, dead = launch_by_hand(tmp_path, "--die-rank", "1", "--timeout", "120")
    assert dead.returncode == 3
    assert survivor.returncode == 2
    assert "lost contact with the other ranks" in survivor.stderr and "rerun the same command" in survivor.stderr
    assert not (tmp_path / "profile.json").exists()
    assert len(list((tmp_path / "shards").glob("shard-0000-*.json"))) == 1   # rank 0's work survives

    runs = launch_by_hand(tmp_path)
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    profile = ImportanceProfile.load(tmp_path / "profile.json")
    assert profile.cost["shards_reused"] == 1
    assert_same_scores(profile, reference)


def test_error_on_one_rank_is_reported_by_every_rank(tmp_path):
    runs = launch_by_hand(tmp_path, "--bad-data-rank", "1")
    assert [r.returncode for r in runs] == [2, 2]
    for r in runs:
        assert "rank 1: IndexError" in r.stderr and "Finished shards are kept" in r.stderr
    assert not (tmp_path / "profile.json").exists()


# --- in-process pieces ------------------------------------------------------------
def test_rank_info_and_is_distributed(monkeypatch):
    assert rank_info().world_size == 1 and not is_distributed()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_info().rank == 1 and rank_info().local_rank == 1 and is_distributed()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(MiOptError, match="outside WORLD_SIZE"):
        rank_info()


def test_rank_max_memory_gives_each_rank_its_own_gpus(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_max_memory(2, "70GiB", "200GiB") == {2: "70GiB", 3: "70GiB", "cpu": "200GiB"}
    with pytest.raises(MiOptError, match="gpus_per_rank"):
        rank_max_memory(0, "70GiB")


def test_assign_units_is_deterministic_complete_and_balanced():
    keys = [f"L{layer}{s}" for layer in range(6) for s in ("", ".attn", ".mlp", ".H0", ".H1")]
    shards = assign_units(list(reversed(keys)), 4)
    assert shards == assign_units(keys, 4)
    assert sorted(k for s in shards for k in s) == sorted(keys)
    # The fast engine's cost of a unit grows with the layers after it: shares stay close.
    costs = [sum(6 - int(k[1:].split(".")[0]) for k in s) for s in shards]
    assert max(costs) - min(costs) <= 6
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_one_process_is_resumable_and_ignores_stale_shards(tmp_path, reference):
    model, windows = tiny_model("llama"), tiny_windows(8, 16)
    first = profile_distributed(model, windows, CONFIG, tmp_path, n_shards=3, progress=False)
    assert_same_scores(first, reference)
    assert first.cost["shards_reused"] == 0 and len(list(tmp_path.glob("shard-*.json"))) == 3
    second = profile_distributed(model, windows, CONFIG, tmp_path, n_shards=3, progress=False)
    assert second.cost["shards_reused"] == 3
    assert_same_scores(second, reference)

    # A shard file whose key does not match (other data) or that is corrupt is recomputed.
    victim = sorted(tmp_path.glob("shard-*.json"))[0]
    payload = json.loads(victim.read_text())
    payload["key"] = "0" * 64
    victim.write_text(json.dumps(payload))
    assert load_shard(victim, "f" * 64) is None
    other = sorted(tmp_path.glob("shard-*.json"))[1]
    other.write_text("{not json")
    third = profile_distributed(model, windows, CONFIG, tmp_path, n_shards=3, progress=False)
    assert third.cost["shards_reused"] == 1
    assert_same_scores(third, reference)


def test_changed_calibration_does_not_reuse_shards(tmp_path):
    model = tiny_model("llama")
    profile_distributed(model, tiny_windows(8, 16, seed=0), CONFIG, tmp_path, progress=False)
    other = profile_distributed(model, tiny_windows(8, 16, seed=1), CONFIG, tmp_path, progress=False)
    assert other.cost["shards_reused"] == 0


def test_merge_rejects_shards_of_different_models(reference):
    alien = ImportanceProfile.from_dict(reference.to_dict())
    alien.model = {**alien.model, "fingerprint": "another"}
    with pytest.raises(MiOptError, match="different models"):
        merge_shards([reference, alien], list(reference.scores))
