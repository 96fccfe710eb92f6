"""Sharded profiling over torch.distributed: ablation sweeps split by unit across ranks.

Launch any script that calls `profile_distributed` with `torchrun` or `accelerate launch`
(both export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Each rank scores a
deterministic share of the units on *all* calibration batches, so every unit's score is
complete on one rank and merging is a union: the merged profile equals the one-process
profile to float tolerance.

Shards are files named by a content hash of (model fingerprint, calibration tokens and
settings, scoring config, unit list). A rank writes each shard atomically as soon as it is
done, and skips a shard whose file already exists, so rerunning the same command after a
crash computes only what is missing. Ranks exchange results through a gloo group (also
under NCCL, whose collectives need CUDA tensors), so no shared filesystem is required.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mi_opt.arch import get_adapter
from mi_opt.artifacts import read_json, write_json
from mi_opt.errors import MiOptError
from mi_opt.handle import as_loaded
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.units import enumerate_units, parse_unit

SHARD_SCHEMA = "mi-opt/profile-shard"
SHARD_VERSION = 1
# Config fields that change speed or memory but not the scores: a resumed run may change them.
_EXECUTION_KNOBS = ("ablations_per_forward", "logit_chunk_tokens", "cache_budget_mb")
# Calibration entries that legitimately differ between ranks or machines.
_PER_RANK_CALIBRATION = ("device", "torch_threads")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info() -> RankInfo:
    """This process's place in the job, from the launcher's environment (1 process if unset)."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if env["WORLD_SIZE"] is None and env["RANK"] is None:
        return RankInfo(0, 1, 0)
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env["LOCAL_RANK"] if env["LOCAL_RANK"] is not None else rank)
    except (TypeError, ValueError) as err:
        raise MiOptError(f"RANK/WORLD_SIZE/LOCAL_RANK are set but not integers ({env}); launch with "
                         "torchrun or accelerate launch, or unset them for one process") from err
    if not 0 <= rank < world:
        raise MiOptError(f"RANK={rank} is outside WORLD_SIZE={world}; check the launcher's settings")
    return RankInfo(rank, world, local)


def is_distributed() -> bool:
    """True under a launcher with more than one process (or an initialized multi-rank group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return rank_info().world_size > 1


def rank_device() -> torch.device:
    """The device this rank should load the model on: its own GPU (LOCAL_RANK) if any, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", rank_info().local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def rank_max_memory(gpus_per_rank: int, gpu_memory: str, cpu_memory: str | None = None) -> dict:
    """accelerate `max_memory` giving this rank GPUs [local_rank * g, (local_rank + 1) * g) only,
    so several ranks on one node can each spread a too-big model over their own GPUs
    (pass it to load_model(spec, device="auto", max_memory=...))."""
    if gpus_per_rank < 1:
        raise MiOptError(f"gpus_per_rank must be >= 1, got {gpus_per_rank}")
    first = rank_info().local_rank * gpus_per_rank
    memory: dict = {gpu: gpu_memory for gpu in range(first, first + gpus_per_rank)}
    if cpu_memory is not None:
        memory["cpu"] = cpu_memory
    return memory


# --- shards -----------------------------------------------------------------------
def assign_units(unit_keys: list[str], n_shards: int) -> list[list[str]]:
    """Round-robin over layer-sorted units: each shard gets units from every depth, so the
    fast engine's cost (which grows with the number of layers after a unit) is balanced."""
    ordered = sorted(unit_keys, key=parse_unit)
    return [ordered[i::n_shards] for i in range(n_shards)]


def windows_digest(windows: torch.Tensor) -> str:
    t = windows.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)};".encode() + t.numpy().tobytes()).hexdigest()


def shard_key(fingerprint: str, windows: torch.Tensor, calibration: dict, config: AblationConfig,
              units: list[str]) -> str:
    """Content hash naming one shard: equal keys mean equal scores."""
    scoring = {k: v for k, v in asdict(config).items() if k not in _EXECUTION_KNOBS}
    payload = {"schema": SHARD_VERSION, "fingerprint": fingerprint, "windows": windows_digest(windows),
               "calibration": {k: v for k, v in calibration.items() if k not in _PER_RANK_CALIBRATION},
               "config": scoring, "units": units}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def shard_path(shard_dir: Path, index: int, n_shards: int, key: str) -> Path:
    return Path(shard_dir) / f"shard-{index:04d}-of-{n_shards:04d}-{key[:16]}.json"


def load_shard(path: Path, key: str) -> ImportanceProfile | None:
    """A finished shard, or None if absent, unreadable or made for other inputs (then recompute)."""
    if not path.is_file():
        return None
    try:
        payload = read_json(path, SHARD_SCHEMA, SHARD_VERSION)
        return ImportanceProfile.from_dict(payload["profile"]) if payload.get("key") == key else None
    except (MiOptError, KeyError, TypeError):
        return None


def _run_shards(model, windows, config, shard_dir, mine, n_shards, calibration, model_spec, progress):
    """Compute (or reuse) this rank's shards; returns one report per shard."""
    loaded = as_loaded(model, model_spec)  # one fingerprint for every shard's key and profile
    fingerprint = loaded.fingerprint
    reports = []
    for index, units in tqdm(mine, desc="shards", unit="shard", disable=not progress):
        key = shard_key(fingerprint, windows, calibration, config, units)
        path = shard_path(shard_dir, index, n_shards, key)
        profile, reused = load_shard(path, key), True
        if profile is None:
            profile, reused = profile_ablation(loaded, windows, config, calibration=calibration,
                                               model_spec=model_spec, progress=progress, units=units), False
            write_json(path, {"schema": SHARD_SCHEMA, "version": SHARD_VERSION, "key": key, "index": index,
                              "n_shards": n_shards, "units": units, "profile": profile.to_dict()})
        reports.append({"index": index, "path": str(path), "reused": reused, "profile": profile.to_dict()})
    return reports


# --- merge ------------------------------------------------------------------------
def merge_shards(shards: list[ImportanceProfile], unit_order: list[str]) -> ImportanceProfile:
    """One profile from per-unit-subset profiles of the same model, data and config."""
    first = shards[0]
    for s in shards[1:]:
        if s.model["fingerprint"] != first.model["fingerprint"]:
            raise MiOptError("shards come from different models (fingerprints "
                             f"{first.model['fingerprint']} vs {s.model['fingerprint']}); every rank must "
                             "load the same checkpoint")
        if abs(s.base_loss - first.base_loss) > 1e-3 * max(1.0, abs(first.base_loss)):
            raise MiOptError(f"shards disagree on the clean loss ({first.base_loss} vs {s.base_loss}): ranks "
                             "saw different calibration data or dtypes; use the same settings on every rank")
    scores = {k: v for s in shards for k, v in s.scores.items()}
    missing = [k for k in unit_order if k not in scores]
    if missing:
        raise MiOptError(f"merged shards lack {len(missing)} unit(s), e.g. {missing[:3]}")
    cost: dict = {"full_forward_equivalents": sum(s.cost.get("full_forward_equivalents", 0.0) for s in shards),
                  "shard_wall_time_s": [s.cost.get("wall_time_s") for s in shards], "n_units": len(unit_order)}
    if any("mean_pass_forwards" in s.cost for s in shards):
        cost["mean_pass_forwards"] = sum(s.cost.get("mean_pass_forwards", 0) for s in shards)
    return ImportanceProfile(model=first.model, method=first.method, calibration=first.calibration,
                             base_loss=first.base_loss, scores={k: scores[k] for k in unit_order}, cost=cost)


# --- process group ----------------------------------------------------------------
def _init_group(info: RankInfo, model, timeout_s: float):
    """Init the default group if the launcher has not (nccl on CUDA, gloo on CPU) and return
    (gloo group for exchanging Python objects, whether we created the default group)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    created = False
    if not dist.is_initialized():
        on_cuda = next(model.parameters()).device.type == "cuda"
        if on_cuda:
            torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        try:
            dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timeout)
        except (RuntimeError, ValueError) as err:
            raise MiOptError(f"rank {info.rank}: could not join the process group ({err}); check "
                             "MASTER_ADDR/MASTER_PORT and that every rank was started") from err
        created = True
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return group, created


def profile_distributed(model, windows: torch.Tensor, config: AblationConfig | None = None,
                        shard_dir: str | Path = "runs/profile/shards", *, calibration: dict | None = None,
                        model_spec: str | None = None, n_shards: int | None = None,
                        timeout_s: float = 4 * 3600, progress: bool = True) -> ImportanceProfile | None:
    """Profile `model` with this rank's share of the units; rank 0 returns the merged profile.

    Without a launcher (one process) it computes every shard itself, which still makes the
    run resumable. n_shards (default: world size) may exceed the world size so a crash loses
    less work; keep it fixed between a run and its restart. timeout_s bounds how long a rank
    waits for the slowest one at the final exchange. Other ranks return None.
    """
    config = config or AblationConfig()
    calibration = dict(calibration or {})
    info = rank_info()
    n_shards = n_shards or info.world_size
    if n_shards < 1 or timeout_s <= 0:
        raise MiOptError(f"n_shards must be >= 1 and timeout_s > 0, got {n_shards} and {timeout_s}")
    started = time.perf_counter()
    unit_order = [u.key for u in enumerate_units(get_adapter(model), config.unit_kinds, config.neuron_group)]
    plan = assign_units(unit_order, n_shards)
    mine = [(i, units) for i, units in enumerate(plan) if i % info.world_size == info.rank and units]
    distributed = info.world_size > 1 or (dist.is_available() and dist.is_initialized())
    group, created = _init_group(info, model, timeout_s) if distributed else (None, False)
    try:
        try:
            report = {"rank": info.rank, "ok": True, "shards": _run_shards(
                model, windows, config, Path(shard_dir), mine, n_shards, calibration, model_spec,
                progress and info.is_main)}
        except Exception as err:  # reported to rank 0 instead of leaving it waiting
            if not distributed:
                raise
            report = {"rank": info.rank, "ok": False, "error": "".join(
                traceback.format_exception_only(type(err), err)).strip(), "shards": []}
        reports = _exchange(report, info, group, shard_dir, timeout_s) if distributed else [report]
    finally:
        if created:
            dist.destroy_process_group()
    failed = [r for r in reports if not r["ok"]]
    if failed:
        details = "; ".join(f"rank {r['rank']}: {r['error']}" for r in failed)
        raise MiOptError(f"profiling failed on {len(failed)} rank(s): {details}. Finished shards are kept in "
                         f"{shard_dir}: rerun the same command to compute only the missing ones")
    if not info.is_main:
        return None
    shard_reports = sorted((s for r in reports for s in r["shards"]), key=lambda s: s["index"])
    profile = merge_shards([ImportanceProfile.from_dict(s["profile"]) for s in shard_reports], unit_order)
    profile.cost.update(wall_time_s=round(time.perf_counter() - started, 3), world_size=info.world_size,
                        n_shards=n_shards, shards_reused=sum(s["reused"] for s in shard_reports))
    return profile


def _exchange(report: dict, info: RankInfo, group, shard_dir, timeout_s: float) -> list[dict]:
    """Every rank's report on every rank, so all ranks agree on success or failure."""
    reports: list = [None] * info.world_size
    try:
        dist.all_gather_object(reports, report, group=group)
    except RuntimeError as err:  # includes DistBackendError: a peer died or exceeded the timeout
        raise MiOptError(f"rank {info.rank}: lost contact with the other ranks while collecting shards "
                         f"({str(err).splitlines()[0][:200]}). A rank died or ran past timeout_s={timeout_s:g}; "
                         f"see its log. Finished shards are kept in {shard_dir}: rerun the same command "
                         "to compute only the missing ones") from err
    return reports
