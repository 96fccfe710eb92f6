"""Which GGML tensor type each weight gets in a GGUF export: the plan's bit widths, mapped.

The bit planner speaks widths 4, 8 and 16, measured with bitsandbytes; GGUF has its own block
formats. The mapping, stated in every exported file's metadata and card:

    16 -> F16    (GgufOptions.float_type: F16, BF16 or F32)
     8 -> Q8_0   (blocks of 32: one f16 scale + 32 int8; 8.5 bits per weight)
     5 -> Q5_0   (blocks of 32: one f16 scale + 32 5-bit values; 5.5 bits per weight)
     4 -> Q4_0   (blocks of 32: one f16 scale + 32 nibbles; 4.5 bits per weight), or Q4_1,
                 Q5_0, Q5_1 through GgufOptions.types (Q4_1 adds a per-block minimum: 5 bits)

Only types the installed `gguf` package can *quantize* are offered: it dequantizes K-quants and
i-quants but writes none of them (see `quantizable_types`). Norm weights and other 1-D tensors
stay F32, as llama.cpp's own conversion keeps them. The embedding follows the plan's "embed" (or
"lm_head") entry, default float_type; when the two are tied they are one GGUF tensor
(token_embd, no output.weight), so both entries must agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from mi_opt.errors import MiOptError
from mi_opt.plan import CompressionPlan

FLOAT_TYPES = ("F16", "BF16", "F32")
QUANTIZERS = ("rtn", "gptq")
DEFAULT_TYPES = {16: "F16", 8: "Q8_0", 5: "Q5_0", 4: "Q4_0"}


def quantizable_types() -> list[str]:
    """GGML type names the installed gguf package can write from float weights."""
    import gguf

    names = []
    for qtype in gguf.GGMLQuantizationType:
        block = gguf.GGML_QUANT_SIZES.get(qtype, (0, 0))[0]
        if qtype.name in ("F32", "F16"):
            names.append(qtype.name)  # plain numpy casts
            continue
        if not block:
            continue
        try:
            gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
        except (NotImplementedError, gguf.quants.QuantError, ValueError, TypeError):
            continue
        names.append(qtype.name)
    return names


@dataclass
class GgufOptions:
    """How plan widths become GGML types. types: width -> type name, overriding DEFAULT_TYPES."""

    float_type: str = "F16"                       # unquantized weights (width 16); 1-D tensors stay F32
    types: dict[int, str] = field(default_factory=dict)  # e.g. {4: "Q4_1"}
    file_name: str = "model.gguf"                 # the file inside the export folder
    vocab_from: str | None = None                 # a GGUF file to copy tokenizer.* metadata from (default: the source)
    # "rtn": every block rounded to nearest (llama.cpp's own conversion); "gptq": Q4_0 / Q5_0 blocks
    # by GPTQ, error-compensated on calibration windows (mi_opt/quant/gptq.py), the rest to nearest.
    quantizer: str = "rtn"
    calibration_windows: int = 32                 # handbook calibration windows of 256 tokens for GPTQ's Hessians

    def __post_init__(self):
        self.quantizer = str(self.quantizer).lower()
        if self.quantizer not in QUANTIZERS:
            raise MiOptError(f"gguf quantizer {self.quantizer!r}: use one of {', '.join(QUANTIZERS)}")
        if int(self.calibration_windows) < 1:
            raise MiOptError(f"gguf calibration_windows must be >= 1, got {self.calibration_windows}")
        self.float_type = self.float_type.upper()
        if self.float_type not in FLOAT_TYPES:
            raise MiOptError(f"gguf float_type {self.float_type!r}: use one of {', '.join(FLOAT_TYPES)}")
        self.types = {int(k): str(v).upper() for k, v in self.types.items()}
        bad = sorted(set(self.types) - set(DEFAULT_TYPES))
        if bad:
            raise MiOptError(f"gguf types for widths {bad}: plans use widths {sorted(DEFAULT_TYPES)}")
        if not self.file_name.endswith(".gguf") or "/" in self.file_name:
            raise MiOptError(f"gguf file_name {self.file_name!r}: give a plain name ending in .gguf")

    def mapping(self) -> dict[int, str]:
        """width -> GGML type name, checked against what the installed writer can produce."""
        merged = {**DEFAULT_TYPES, 16: self.float_type, **self.types}
        can = quantizable_types()
        for width, name in merged.items():
            if name not in can:
                raise MiOptError(f"GGUF type {name} (for width {width}) cannot be written by the installed gguf "
                                 f"package; it quantizes only {', '.join(can)}")
        return merged


def _plan_layer(key: str) -> tuple[int, str | None]:
    """(layer in original numbering, module path or None) of a bits key L<i>[.<path>]."""
    from mi_opt.units import parse_unit

    head, _, path = key.partition(".")
    return parse_unit(head).layer, path or None


def renumbered_bits(plan: CompressionPlan) -> dict[str, int]:
    """The plan's per-layer bits keys in the numbering of the layer-dropped model (dropped layers left out)."""
    dropped = sorted(plan.drop_layers)
    out = {}
    for key, width in plan.bits.items():
        if key in ("embed", "lm_head"):
            out[key] = width
            continue
        layer, path = _plan_layer(key)
        if layer in dropped:
            continue
        new = layer - sum(d < layer for d in dropped)
        out[f"L{new}" + (f".{path}" if path else "")] = width
    return out


def tensor_types(model: nn.Module, plan: CompressionPlan, options: GgufOptions) -> dict[str, str]:
    """Parameter name (as named_parameters lists it, tied ones once) -> GGML type name.

    Raises MiOptError, before anything is written, for a width without a type or a weight whose
    rows do not split into the type's blocks."""
    import gguf

    from mi_opt.arch import get_adapter
    from mi_opt.surgery.quantize import is_tied, resolve_targets

    mapping = options.mapping()
    bits = renumbered_bits(plan)
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    widths = {f"{name}.weight": w for name, w in
              resolve_targets(model, {k: w for k, w in bits.items() if k not in ("embed", "lm_head")}).items()}
    embed_w, head_w = bits.get("embed"), bits.get("lm_head")
    embed_name = names[id(adapter.embedding())] + ".weight"
    if is_tied(model):
        if embed_w is not None and head_w is not None and embed_w != head_w:
            raise MiOptError(f"bits['embed'] = {embed_w} but bits['lm_head'] = {head_w}, and this model ties them: "
                             "in GGUF they are one tensor (token_embd); give one width")
        widths[embed_name] = embed_w or head_w or 16
    else:
        widths[embed_name] = embed_w or 16
        widths[names[id(adapter.lm_head())] + ".weight"] = head_w or 16
    out = {}
    for name, p in model.named_parameters():
        if p.dim() < 2:
            out[name] = "F32"
            continue
        kind = mapping[widths.get(name, 16)]
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
        if p.shape[-1] % block:
            raise MiOptError(f"{name} has rows of {p.shape[-1]} values, which do not split into {kind}'s blocks of "
                             f"{block}; give it another width in the plan (16 keeps it {options.float_type})")
        out[name] = kind
    return out
