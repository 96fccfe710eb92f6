"""Versioned JSON artifacts, atomic writes, and the facts every artifact records."""
from __future__ import annotations

import hashlib
import json
import math
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
    from mi_opt import tmpfiles

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpfiles.remove_leftovers(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=tmpfiles.prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, tmpfiles.umask_mode(0o666))  # mkstemp's 0600 would hide it from a shared folder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, payload: dict) -> Path:
    """Strict JSON only: NaN and Infinity are not JSON, and an artifact holding them hides a broken result."""
    try:
        text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=False)
    except ValueError:
        bad = _first_non_finite(payload)
        if not bad:  # a circular reference: a bug, not a result
            raise
        raise MiOptError(f"refusing to write {path}: {bad} is not a finite number; "
                         "the computation that produced it failed (look for an earlier NaN)") from None
    return atomic_write_bytes(path, (text + "\n").encode())


def _first_non_finite(obj, where: str = "") -> str:
    """The key path of the first NaN or infinity in plain data (for the error message)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{where or 'the value'} ({obj})"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return ""


def read_json(path: str | Path, schema: str, max_version: int) -> dict:
    """Read an artifact, checking its schema name and that this mi-opt can read its version."""
    path = Path(path)
    if not path.is_file():
        raise MiOptError(f"{path} does not exist")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise MiOptError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise MiOptError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(payload, dict):
        raise MiOptError(f"{path} holds a JSON {type(payload).__name__}, expected a {schema!r} artifact (an object)")
    if payload.get("schema") != schema:
        raise MiOptError(f"{path} is a {payload.get('schema')!r} artifact, expected {schema!r}")
    version = payload.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MiOptError(f"{path} has version {version!r}; a {schema} artifact's version is an integer from 1 "
                         f"to {max_version}: it was edited by hand or is not an mi-opt file")
    if version > max_version:
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
        payload = read_json(path, cls.SCHEMA, cls.VERSION)
        try:
            return cls.from_dict(payload)
        except MiOptError as err:
            raise MiOptError(f"{path}: {err}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # a hand-edited or truncated file
            raise MiOptError(f"{path} is not a valid {cls.SCHEMA} artifact ({type(err).__name__}: {err}); "
                             "re-create it with mi-opt") from None


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


# Config entries that say how a model is called or where it came from, not what it computes: the
# same weights loaded from another folder, or run with use_cache off, are the same model.
_RUNTIME_CONFIG_KEYS = {"transformers_version", "use_cache", "output_attentions", "output_hidden_states",
                        "return_dict", "dtype", "torch_dtype"}


def model_fingerprint(model: nn.Module, tokenizer=None) -> str:
    """A short sha256 of the config, every byte of every weight and buffer, and the tokenizer if given.

    Every byte, because resume-by-hash is only as good as the hash: sampling each tensor let a model
    changed beyond the sample reuse every cached stage. sha256 streams at about 1 GB/s, half a second
    for SmolLM2-135M in fp32, so it is recomputed each time rather than cached by something that
    in-place edits could leave stale.
    """
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _RUNTIME_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    seen: dict[tuple, str] = {}  # tied weights (lm_head = embeddings) are hashed once
    for name, tensor in _plain_tensors(model.state_dict()):
        if not isinstance(tensor, torch.Tensor):  # extra state some modules keep
            h.update(f"{name}={tensor!r};".encode())
            continue
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        if tensor.device.type == "meta" or not tensor.numel():
            continue
        where = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                 tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if where in seen:
            h.update(f"same as {seen[where]};".encode())
            continue
        seen[where] = name
        h.update(tensor_bytes(tensor))
    if tokenizer is not None:
        h.update(tokenizer_digest(tokenizer).encode())
    return h.hexdigest()[:16]


def _plain_tensors(state: dict):
    """(name, tensor) pairs with tensor subclasses (torchao's quantized weights) opened into the plain
    tensors they hold (`name._qdata`, `name._scale`, ...): a subclass has no storage of its own to read."""
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
            inner, context = tensor.__tensor_flatten__()
            yield f"{name}:{type(tensor).__name__}", repr(context)
            yield from _plain_tensors({f"{name}._{k}": getattr(tensor, k) for k in inner})
        else:
            yield name, tensor


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw bytes on the CPU, any dtype (bf16 included, which numpy cannot hold)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what turns text into ids: the fast tokenizer's full JSON, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return hashlib.sha256((text + specials).encode()).hexdigest()
