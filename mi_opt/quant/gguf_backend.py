"""The GGUF backend: llama.cpp's block formats (Q8_0 for 8 bits; Q5_0 for 5; Q4_0, Q4_1, Q5_0 or Q5_1 for 4),
quantized by the `gguf` package's own quantizers and shipped as one .gguf file (export format gguf,
mi_opt/formats/gguf.py).

In memory a GGUF-quantized weight is its round trip: quantized to the block format and
dequantized, in place, in an ordinary nn.Linear. That is what llama.cpp computes with (up to its
own matmul order), so the sensitivity profiler measures with it (the matched intervention) and an
evaluated model measures what the file holds. Nothing here is a safetensors checkpoint: a plan with
this backend is exported with format gguf.
"""
from __future__ import annotations

import torch
from torch import nn

from mi_opt.errors import MiOptError
from mi_opt.quant.base import QuantBackend, QuantOptions

# bytes per block of 32 weights (GGML_QUANT_SIZES): the bit planner's byte budget
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}


class GgufBackend(QuantBackend):
    name = "gguf"
    # Width 5 is Q5_0 (5.5 bits a weight), the step between Q4_0 and Q8_0 that llama.cpp's own mixes
    # take for rows K-quants cannot split (SmolLM2's 576, Gemma 3's 640). The "4-bit" slot keeps its
    # historical choices, so plan.quant_type Q5_0 / Q5_1 still reads as before.
    formats = {8: ("Q8_0",), 5: ("Q5_0",), 4: ("Q4_0", "Q4_1", "Q5_0", "Q5_1")}
    devices = ("cpu", "cuda")  # where the round-tripped weights compute in memory; the file runs in llama.cpp
    export_formats = ("gguf",)
    serialization = "one .gguf file (GGML block types per tensor), written by mi_opt/formats/gguf.py"
    tied_lm_head_ok = True  # GGUF stores a tied pair as one tensor (token_embd) at one width
    transformers_reloads = "transformers reads the file with gguf_file= (dequantized); llama.cpp runs it"

    def version(self) -> str:
        from importlib.metadata import version

        return version("gguf")

    def ggml_type(self, width: int, options: QuantOptions) -> str:
        return self.quant_type(options.quant_type) if width == 4 else self.formats[width][0]

    def written_mismatch(self, mapping: dict[int, str], widths, options: QuantOptions) -> tuple[int, str, str] | None:
        """(width, type measured, type written) for the first of `widths` whose GGML type in an export's
        mapping (GgufOptions.mapping) is not the one its damage is measured with; None when all agree."""
        for width in sorted(widths):
            measured = self.ggml_type(width, options)
            if mapping[width] != measured:
                return width, measured, mapping[width]
        return None

    def round_trip(self, weight: torch.Tensor, kind: str) -> torch.Tensor:
        """`weight` quantized to GGML type `kind` and dequantized, in its own dtype and device."""
        import gguf

        from mi_opt.formats.gguf import ggml_round_trip

        if weight.shape[-1] % 32:
            raise MiOptError(f"a weight with rows of {weight.shape[-1]} values does not split into {kind}'s blocks of "
                             "32; give it width 16 in the plan")
        return ggml_round_trip(weight.detach(), gguf.GGMLQuantizationType[kind])[1].to(weight.device, weight.dtype)

    def quantized_linear(self, linear: nn.Linear, width: int, options: QuantOptions) -> nn.Module:
        from mi_opt.arch import linear_from

        self.check_widths([width], "quantized_linear")
        bias = linear.bias.detach() if linear.bias is not None else None
        return linear_from(self.round_trip(linear.weight, self.ggml_type(width, options)), bias).eval()

    def quantize_(self, model: nn.Module, bits: dict[str, int], options: QuantOptions) -> dict[str, int]:
        from mi_opt.arch import get_adapter
        from mi_opt.surgery.quantize import resolve_targets

        self.check_bits(bits, options.quant_type)
        adapter = get_adapter(model)
        special = {k: w for k, w in bits.items() if k in ("embed", "lm_head") and w < 16}
        if adapter.is_tied() and len(set(special.values())) > 1:
            raise MiOptError(f"bits['embed'] = {special['embed']} but bits['lm_head'] = {special['lm_head']}, and this "
                             "model ties them: in GGUF they are one tensor (token_embd); give one width")
        targets = {n: w for n, w in resolve_targets(model, {k: w for k, w in bits.items() if k not in special}).items()
                   if w < 16}
        names = {id(m): n for n, m in model.named_modules()}
        for key, width in special.items():  # tied: one matrix, quantized once
            module = adapter.embedding() if key == "embed" else adapter.lm_head()
            targets.setdefault(names[id(module)], width)
        self.check_devices(model, targets)
        with torch.no_grad():
            for name, width in targets.items():
                weight = model.get_submodule(name).weight
                weight.copy_(self.round_trip(weight, self.ggml_type(width, options)))
        return targets

    def is_quantized(self, module: nn.Module) -> bool:
        return False  # round-tripped weights are ordinary tensors: the plan says which ones are GGUF

    def quantized_bytes(self, numel: int, out_features: int, bits: int, has_bias: bool = False) -> int:
        bias = 4 * out_features if has_bias else 0  # 1-D tensors stay F32 in GGUF
        if bits == 16:
            return 2 * numel + bias
        kind = self.formats[bits][0]  # the default format of the width (Q8_0, Q5_0, Q4_0)
        return -(-numel // 32) * BLOCK_BYTES[kind] + bias
