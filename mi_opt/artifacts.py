"""Versioned JSON artifacts, atomic writes, and the facts every artifact records."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mi_opt.errors import MiOptError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write via a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, payload: dict) -> Path:
    return atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path, schema: str, max_version: int) -> dict:
    """Read an artifact, checking its schema name and that this mi-opt can read its version."""
    path = Path(path)
    if not path.is_file():
        raise MiOptError(f"{path} does not exist")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MiOptError(f"{path} is not valid JSON: {err}") from err
    if payload.get("schema") != schema:
        raise MiOptError(f"{path} is a {payload.get('schema')!r} artifact, expected {schema!r}")
    if int(payload.get("version", 0)) > max_version:
        raise MiOptError(f"{path} has {schema} version {payload['version']}; this mi-opt reads up to "
                         f"{max_version}: upgrade mi-opt")
    return payload


class JsonArtifact:
    """to_dict / save / from_dict / load for a dataclass artifact.

    A subclass sets class attributes SCHEMA ("mi-opt/<name>") and VERSION; loading checks both.
    """

    SCHEMA = ""
    VERSION = 1

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"schema": self.SCHEMA, "version": self.VERSION, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{k: v for k, v in d.items() if k not in ("schema", "version")})

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(read_json(path, cls.SCHEMA, cls.VERSION))


def versions() -> dict[str, str]:
    """Package versions and the git commit, so a number can be traced to the code that made it."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("mi-opt", "torch", "transformers", "accelerate", "bitsandbytes", "lm_eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                    capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        out["git"] = "unknown"
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the architecture and a sample of every weight.

    Cheap enough for billion-parameter models (at most 256 values per tensor), yet any
    pruning, quantization or different checkpoint changes it.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "n_layer", "n_head", "n_embd"):
        h.update(f"{key}={cfg.get(key)};".encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        if tensor.is_floating_point() and tensor.numel() and tensor.device.type != "meta":
            sample = tensor.detach().flatten()[:256].to("cpu", torch.float32)
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
