"""The bitsandbytes backend: int8 `Linear8bitLt` (LLM.int8, outlier threshold) and 4-bit nf4/fp4
`Linear4bit`, as mi-opt always did. The implementation (and the CPU repacking trap it works
around) stays in mi_opt/surgery/quantize.py; this class only puts it behind the backend interface."""
from __future__ import annotations

import torch
from torch import nn

from mi_opt.quant.base import QuantBackend, QuantOptions
from mi_opt.units import QUANT_TYPES


class BitsAndBytesBackend(QuantBackend):
    name = "bitsandbytes"
    formats = {8: ("llm.int8",), 4: QUANT_TYPES}
    devices = ("cpu", "cuda", "xpu")
    serialization = ("safetensors in bitsandbytes' canonical layout (int8 + row scales SCB; packed nibbles + "
                     "float32 absmax), BitsAndBytesConfig in config.json")
    transformers_reloads = ("yes for one width (and one 4-bit format) with lm_head unquantized; mixed widths "
                            "reload through mi_opt.export.load_compressed")
    embed_refusal = ("mi-opt cannot quantize token embeddings with bitsandbytes (it has no int8 embedding for "
                     "inference and transformers cannot reload its 4-bit one)")

    def version(self) -> str:
        import bitsandbytes

        return bitsandbytes.__version__

    def quantized_linear(self, linear: nn.Linear, width: int, options: QuantOptions) -> nn.Module:
        from mi_opt.surgery.quantize import quantized_linear

        return quantized_linear(linear, width, self.quant_type(options.quant_type), options.int8_threshold)

    def quantize_(self, model: nn.Module, bits: dict[str, int], options: QuantOptions) -> dict[str, int]:
        from mi_opt.surgery.quantize import quantize_

        return quantize_(model, bits, self.quant_type(options.quant_type), options.int8_threshold)

    def is_quantized(self, module: nn.Module) -> bool:
        # By the classes' modules: asking about an unquantized model never imports bitsandbytes.
        return any(c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)

    def save(self, model: nn.Module, out_dir, replace: dict[str, torch.Tensor] | None = None) -> dict:
        from mi_opt.surgery.quantize import save_quantized

        return save_quantized(model, out_dir, replace)

    def load_(self, model: nn.Module, folder, metadata: dict) -> None:
        from mi_opt.surgery.quantize import load_quantized_

        load_quantized_(model, folder, metadata)
