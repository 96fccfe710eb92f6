"""What every quantization backend declares and does: the one interface apply_, export, the
sensitivity profiler and the bit planner talk to (registered in mi_opt/quant/__init__.py).

A backend is a class with one job: turning a plan's `bits` (module key -> 4 | 8 | 16) into the
modules or weights a runtime computes with, and storing them so that runtime loads them. It
declares up front what it offers (widths, and formats per width), where its kernels run and how
its exports are stored, so a plan it cannot carry out is refused before anything changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mi_opt.errors import MiOptError
from mi_opt.units import parse_module_key


def load_remaining_(model: nn.Module, state: dict[str, torch.Tensor], metadata: dict, path) -> None:
    """Load the weights left once the quantized modules took theirs; one MiOptError when they do not
    fit (a key is missing that neither a quantized module nor a tied weight explains, or one is left over)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    quantized = tuple(n + "." for n in metadata["modules"])
    tied = set(metadata.get("tied_not_saved", []))
    missing = [k for k in missing if not k.startswith(quantized) and k not in tied]
    if missing or unexpected:
        raise MiOptError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         "(was the model rebuilt with the same surgery?)")


@dataclass(frozen=True)
class QuantOptions:
    """The plan fields a backend reads besides the widths."""

    quant_type: str | None = None   # 4-bit format (bitsandbytes nf4/fp4, GGUF Q4_0/...); None: the default
    int8_threshold: float = 6.0     # LLM.int8's outlier threshold (bitsandbytes int8 only)

    @classmethod
    def of(cls, plan) -> "QuantOptions":
        return cls(plan.quant_type, plan.int8_threshold)


class QuantBackend:
    name: str = ""
    formats: dict[int, tuple[str, ...]] = {}   # width -> formats it offers, the first being the default
    refused: dict[int, str] = {}               # width -> the sentence saying why it is not offered
    devices: tuple[str, ...] = ("cpu",)        # device types its kernels run on
    export_formats: tuple[str, ...] = ("safetensors",)  # mi-opt export formats that carry it
    serialization: str = ""                    # how an export stores the quantized weights
    transformers_reloads: str = ""             # whether (and when) plain from_pretrained rebuilds it
    embed_refusal: str | None = None           # why bits['embed'] < 16 is refused (None: allowed)

    # --- what it offers -------------------------------------------------------------
    def version(self) -> str:
        """The installed library's version, recorded next to every measurement made with it."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version(), "formats": {str(w): list(f) for w, f in self.formats.items()},
                "devices": list(self.devices), "serialization": self.serialization,
                "transformers_reloads": self.transformers_reloads}

    def widths(self) -> tuple[int, ...]:
        return tuple(sorted(self.formats)) + (16,)

    def quant_type(self, requested: str | None) -> str | None:
        """The 4-bit format to use: `requested`, checked, or the default (None without 4-bit)."""
        offered = self.formats.get(4, ())
        if requested is None:
            return offered[0] if offered else None
        if requested not in offered:
            raise MiOptError(f"quantization backend {self.name} has no 4-bit format {requested!r}"
                             + (f"; it offers {', '.join(offered)}" if offered else f": {self.why_not(4)}"))
        return requested

    def why_not(self, width: int) -> str:
        return self.refused.get(width, f"{self.name} offers widths {', '.join(map(str, self.widths()))}")

    def check_widths(self, widths, what: str = "the plan") -> None:
        """One MiOptError naming the first width the backend lacks."""
        for width in sorted(set(widths)):
            if width != 16 and width not in self.formats:
                raise MiOptError(f"{what} asks for {width}-bit weights, which quantization backend {self.name} "
                                 f"does not offer: {self.why_not(width)}")

    def check_bits(self, bits: dict[str, int], quant_type: str | None) -> None:
        """Every reason this backend cannot carry out `bits` that needs no model."""
        self.check_widths([w for w in bits.values()], "the plan")
        if any(w == 4 for w in bits.values()):
            self.quant_type(quant_type)
        if self.embed_refusal and any(parse_module_key(k).special == "embed" and w < 16 for k, w in bits.items()):
            raise MiOptError(f"bits['embed'] < 16: {self.embed_refusal}; remove the 'embed' entry or set it to 16")

    tied_lm_head_ok: bool = False               # True where a tied lm_head quantizes with its embedding (GGUF)

    def check_model(self, model: nn.Module, bits: dict[str, int], quant_type: str | None) -> None:
        """check_bits, and the refusals that depend on the model (a tied lm_head)."""
        from mi_opt.arch import get_adapter

        self.check_bits(bits, quant_type)
        if bits.get("lm_head", 16) < 16 and not self.tied_lm_head_ok and get_adapter(model).is_tied():
            raise MiOptError("bits['lm_head'] < 16 but lm_head is tied to the embedding matrix (this model ties "
                             "them), so it stays 16-bit; drop the entry, or call "
                             "mi_opt.surgery.quantize.untie_lm_head_(model) first to quantize a separate copy")

    def check_devices(self, model: nn.Module, names) -> None:
        for name in names:
            device = model.get_submodule(name).weight.device
            if device.type not in self.devices:
                raise MiOptError(f"{name} is on {device}; {self.name} kernels run on {', '.join(self.devices)} only")

    # --- doing it -------------------------------------------------------------------
    def quantized_linear(self, linear: nn.Linear, width: int, options: QuantOptions) -> nn.Module:
        """A new module computing as `linear` quantized to `width` would (the linear is left as it was):
        what the sensitivity profiler swaps in, the matched intervention."""
        raise NotImplementedError

    def quantize_(self, model: nn.Module, bits: dict[str, int], options: QuantOptions) -> dict[str, int]:
        """Quantize the named modules in place; returns full module name -> width applied."""
        raise NotImplementedError

    def is_quantized(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def quantized_bytes(self, numel: int, out_features: int, bits: int, has_bias: bool = False) -> int:
        """Storage of one linear at a width (16 = a bf16 copy); the bit planner's byte budget."""
        from mi_opt.surgery.quantize import quantized_bytes

        return quantized_bytes(numel, out_features, bits, has_bias)

    # --- storing it -----------------------------------------------------------------
    def save(self, model: nn.Module, out_dir, replace: dict[str, torch.Tensor] | None = None) -> dict:
        """Write the weights into out_dir; return the sidecar's quantization metadata, with "backend",
        "loader" ("transformers" or "mi_opt") and "quantization_config" (config.json's, or None)."""
        raise MiOptError(f"quantization backend {self.name} is exported with format "
                         f"{' or '.join(self.export_formats)}, not as a safetensors checkpoint")

    def load_(self, model: nn.Module, folder, metadata: dict) -> None:
        """Turn the listed modules of a full-precision model (post-surgery shapes) into quantized ones
        and load every saved weight (load_compressed)."""
        raise NotImplementedError
