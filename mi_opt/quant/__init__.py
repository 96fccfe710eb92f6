"""Quantization backends, one module each, behind one registry: `get_backend(name)`.

    bitsandbytes  LLM.int8 (outlier threshold) and nf4/fp4 modules; safetensors, BitsAndBytesConfig
    torchao       int8 weight-only (per-row scales) tensor subclasses; safetensors, TorchAoConfig
    gguf          llama.cpp block formats Q8_0, Q4_0, ...; one .gguf file (mi_opt/formats/gguf.py)

Each backend declares its widths and formats, devices and serialization (mi_opt/quant/base.py);
plans name theirs in `CompressionPlan.backend` (default bitsandbytes, what plans had before the
field), and the sensitivity a plan is made from must have been measured with the same one.
Backends import their library only when they quantize, so listing them costs nothing.
"""
from __future__ import annotations

from mi_opt.quant.base import QuantBackend, QuantOptions
from mi_opt.registry import Registry

BACKENDS: Registry[QuantBackend] = Registry("quantization backend")
DEFAULT_BACKEND = "bitsandbytes"


def get_backend(name: str) -> QuantBackend:
    return BACKENDS.get(name)


def backend_of(model) -> QuantBackend | None:
    """The backend whose modules the model holds (None: nothing quantized); mixing two is an error."""
    from mi_opt.errors import MiOptError

    found = {name for name in BACKENDS.names() for m in model.modules() if BACKENDS.get(name).is_quantized(m)}
    if len(found) > 1:
        raise MiOptError(f"the model holds modules quantized by {' and '.join(sorted(found))}: one checkpoint "
                         "is written by one quantization backend")
    return BACKENDS.get(found.pop()) if found else None


def _register() -> None:
    from mi_opt.quant.bitsandbytes_backend import BitsAndBytesBackend
    from mi_opt.quant.gguf_backend import GgufBackend
    from mi_opt.quant.torchao_backend import TorchAoBackend

    for cls in (BitsAndBytesBackend, TorchAoBackend, GgufBackend):
        BACKENDS.register(cls.name)(cls())


_register()

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "QuantBackend", "QuantOptions", "backend_of", "get_backend"]
