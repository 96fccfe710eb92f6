"""Per-module quantization with bitsandbytes: int8 `Linear8bitLt`, 4-bit nf4/fp4 `Linear4bit`.

Targets use the plan's keys (mi_opt/plan.py `CompressionPlan.bits`): "L<i>" (every linear of
decoder layer i), "L<i>.<path>" (one module, or every linear under a submodule, path relative to
the layer), "embed", "lm_head". A module key overrides its layer's key. Width 16 = leave as is.

Rules that are decisions, not accidents:
- Token embeddings cannot be quantized: bitsandbytes has no int8 embedding for inference and its
  4-bit embedding cannot be reloaded by transformers. Asking for it is an error.
- A tied lm_head (it *is* the embedding matrix, as in SmolLM2) stays 16-bit: quantizing it would
  quantize the embedding too. Call `untie_lm_head_(model)` first to quantize a separate copy.
- Linears a family stores otherwise (GPT-2 keeps weights as [in, out]) are converted to the equivalent nn.Linear
  first (`ArchAdapter.as_linear`).

The CPU trap (bitsandbytes 0.50.2, CPUs with AVX512-BF16): the first Linear4bit forward on CPU
repacks the weight for a fused kernel (`functional._convert_weight_packed_for_cpu`): nibbles are
interleaved in blocks of 32 rows, absmax is dequantized (if nested), transposed to
[in/blocksize, out] and rounded to bf16. `Linear4bit._save_to_state_dict` then calls the "best
effort" inverse, which restores the nibbles but leaves absmax transposed in bf16 when the stats
were not nested (reloads as garbage), or re-quantizes nested absmax with a new offset (reloads
close but not equal). Worse, the inverse runs *in place*, so any `state_dict()` call (a
fingerprint, an export) corrupts the live model. `SafeLinear4bit` writes the canonical form
instead and never mutates: nibbles unpacked, absmax un-transposed in float32 and not nested,
holding exactly the bf16 values the fused kernel computes with, so a reload repacks to the
same bits and gives identical logits.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from mi_opt.arch import get_adapter, linear_from
from mi_opt.errors import MiOptError
from mi_opt.plan import INT8_THRESHOLD, check_int8_threshold
from mi_opt.units import BIT_WIDTHS, QUANT_TYPES, parse_module_key, resolve_linears

BLOCKSIZE = 64           # bitsandbytes' 4-bit block: one absmax per 64 weights


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - a dependency, but say what to do
        raise MiOptError("quantization needs bitsandbytes: pip install 'bitsandbytes>=0.48'") from err
    return bnb


class SafeLinear4bit(_bnb().nn.Linear4bit):
    """A `Linear4bit` whose `state_dict()` is canonical and leaves the live module untouched."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for k, v in canonical_4bit_state(self).items():
            destination[prefix + k] = v if keep_vars else v.detach()


def _cpu_packable(module: nn.Module) -> bool:
    """The fused CPU kernel asserts out % 32 == 0 and reshapes absmax per row of in/BLOCKSIZE blocks."""
    return module.out_features % 32 == 0 and module.in_features % BLOCKSIZE == 0


def canonical_4bit_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """weight, bias and quant-state tensors of a Linear4bit in the layout a fresh quantization has."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        state = copy.copy(state)          # the inverse edits its argument: work on a copy
        absmax_t = state.absmax           # [in/blocksize, out], bf16: what the kernel uses
        state.original_nested = False     # skip the lossy re-quantization of absmax
        weight, state = _convert_weight_packed_for_cpu_inverse(weight, state)
        state.absmax = absmax_t.T.reshape(-1).float().contiguous()
        state.dtype = state.original_dtype
        state.nested, state.offset, state.state2 = False, None, None
        for attr in ("original_dtype", "original_nested", "original_qshape", "original_storage_type"):
            state.__dict__.pop(attr, None)
    out = {"weight": weight}
    if module.bias is not None:
        out["bias"] = module.bias.data
    if state is not None:
        out.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return out


def untie_lm_head_(model: nn.Module) -> None:
    """Give lm_head its own copy of the embedding matrix so it can be quantized separately."""
    adapter = get_adapter(model)
    head, embed = adapter.lm_head(), adapter.embedding()
    if head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def is_tied(model: nn.Module) -> bool:
    return get_adapter(model).is_tied()


def resolve_targets(model: nn.Module, bits: dict[str, int]) -> dict[str, int]:
    """Full module name -> width for every module a bits dict names (width 16 included).

    Raises MiOptError, before anything changes, for unknown keys, bad widths, embeddings and a
    tied lm_head.
    """
    adapter = get_adapter(model)
    by_layer: dict[str, int] = {}
    by_module: dict[str, int] = {}
    for key, width in bits.items():
        if width not in BIT_WIDTHS:
            raise MiOptError(f"bits[{key!r}] = {width!r}; widths must be one of {BIT_WIDTHS}")
        target = parse_module_key(key)
        if target.special == "embed":
            if width < 16:
                raise MiOptError("bits['embed'] < 16: mi-opt cannot quantize token embeddings (bitsandbytes has no "
                                 "int8 embedding for inference and transformers cannot reload its 4-bit one); "
                                 "remove the 'embed' entry or set it to 16")
            continue
        if target.special == "lm_head" and width < 16 and is_tied(model):
            raise MiOptError("bits['lm_head'] < 16 but lm_head is tied to the embedding matrix (this model ties "
                             "them), so it stays 16-bit; drop the entry, or call "
                             "mi_opt.surgery.quantize.untie_lm_head_(model) first to quantize a separate copy")
        chosen = resolve_linears(adapter, target)
        if not chosen:
            linears = adapter.full_precision_linears(adapter.layers()[target.layer])
            raise MiOptError(f"bits target {key!r} matches no linear module of layer {target.layer}; its linear "
                             f"modules are: {', '.join(sorted(linears)) or 'none (already quantized?)'}")
        for name in chosen:
            (by_layer if target.path is None and not target.special else by_module)[name] = width
    return {**by_layer, **by_module}  # a module key overrides its layer key


def empty_bnb_module(linear: nn.Module, width: int, quant_type: str,
                     int8_threshold: float = INT8_THRESHOLD) -> nn.Module:
    """An unquantized bnb shell with the linear's shape, dtype and device."""
    bnb = _bnb()
    if width == 8:
        return bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                   has_fp16_weights=False, threshold=int8_threshold, device=linear.weight.device)
    q = SafeLinear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       compute_dtype=linear.weight.dtype, compress_statistics=False, quant_type=quant_type,
                       device=linear.weight.device)
    q.support_avx512bf16_for_cpu = q.support_avx512bf16_for_cpu and _cpu_packable(q)
    return q


def quantized_linear(linear: nn.Linear, width: int, quant_type: str,
                     int8_threshold: float = INT8_THRESHOLD) -> nn.Module:
    """A new bnb module holding `linear` quantized to `width` (the linear itself is left as it was)."""
    bnb = _bnb()
    q = empty_bnb_module(linear, width, quant_type, int8_threshold)
    device = linear.weight.device
    data = linear.weight.detach().clone()
    if width == 8:
        q.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    else:
        q.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type=quant_type,
                                     compress_statistics=False, module=q)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return q.to(device).eval()  # .to(device) is where bitsandbytes quantizes


def _as_linear(model: nn.Module, module: nn.Module) -> nn.Linear:
    return get_adapter(model).as_linear(module)


def quantize_(model: nn.Module, bits: dict[str, int], quant_type: str = "nf4",
              int8_threshold: float = INT8_THRESHOLD) -> dict[str, int]:
    """Replace the named modules in place with bnb int8/4-bit modules; returns name -> bits applied."""
    if quant_type not in QUANT_TYPES:
        raise MiOptError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    int8_threshold = check_int8_threshold(int8_threshold)
    targets = {n: w for n, w in resolve_targets(model, bits).items() if w < 16}
    for name in targets:
        device = model.get_submodule(name).weight.device
        if device.type not in ("cpu", "cuda", "xpu"):
            raise MiOptError(f"{name} is on {device}; bitsandbytes kernels run on cpu, cuda or xpu only")
    for name, width in targets.items():
        original = model.get_submodule(name)
        q = quantized_linear(_as_linear(model, original), width, quant_type, int8_threshold)
        q.source_cls = type(original)  # the attribute transformers sets too: tells a converted origin apart
        model.set_submodule(name, q)
    return targets


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a bnb module computes with, [out, in]: its response to the identity.

    Exact for both widths: an identity row has absmax 1, so int8 activation rounding is lossless
    and no column crosses LLM.int8's outlier threshold; 4-bit modules dequantize their weight.
    Read through the forward because on CPU the stored 4-bit layout is repacked after first use.
    """
    dtype = torch.float32 if _width(module) == 8 else module.compute_dtype or torch.float32
    device = module.weight.device
    with torch.no_grad():
        eye = torch.eye(module.in_features, dtype=dtype, device=device)
        return (module(eye) - module(torch.zeros(1, module.in_features, dtype=dtype, device=device))).T.float()


def _width(module: nn.Module) -> int:
    return 8 if isinstance(module, _bnb().nn.Linear8bitLt) else 4


def requantize_(model: nn.Module, name: str, weight: torch.Tensor, like: nn.Module | None = None) -> nn.Module:
    """Replace module `name` by a bnb module holding `weight` (float, [out, in]) at the width,
    format and threshold of `like` (default: the bnb module now there), e.g. after adding a
    trained update. Rounding to nearest again, so an update smaller than half a quantization
    step is lost: heal measures what survives."""
    module = like if like is not None else model.get_submodule(name)
    width = _width(module)
    threshold = module.state.threshold if width == 8 else INT8_THRESHOLD
    q = quantized_linear(linear_from(weight, model.get_submodule(name).bias), width,
                   getattr(module.weight, "quant_type", "nf4"), threshold)
    q.source_cls = getattr(module, "source_cls", nn.Linear)
    model.set_submodule(name, q)
    return q


def quantized_modules(model: nn.Module) -> dict[str, tuple[int, str | None]]:
    """Full name -> (bits, 4-bit quant type or None) of every bnb module in the model."""
    bnb = _bnb()
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            out[name] = (8, None)
        elif isinstance(m, bnb.nn.Linear4bit):
            out[name] = (4, m.weight.quant_type)
    return out


def quantized_bytes(numel: int, out_features: int, bits: int, has_bias: bool = False) -> int:
    """Storage of one linear at a width: weights plus scales (16-bit means a bf16/fp16 copy)."""
    bias = 2 * out_features if has_bias else 0
    if bits == 16:
        return 2 * numel + bias
    if bits == 8:
        return numel + 4 * out_features + bias          # int8 weights + one fp32 scale per row
    return (numel + 1) // 2 + 4 * -(-numel // BLOCKSIZE) + bias  # packed nibbles + fp32 absmax per block


# --- saving and loading ----------------------------------------------------------------
WEIGHTS_FILE = "model.safetensors"


def _state_dict_for_saving(model: nn.Module, replace: dict[str, torch.Tensor] | None = None
                           ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The canonical state dict, with tied duplicates dropped (safetensors refuses shared tensors)
    and the entries named in `replace` (e.g. unquantized weights cast to bf16) swapped in."""
    bnb = _bnb()
    for m in model.modules():
        if type(m) is bnb.nn.Linear4bit:  # e.g. loaded by transformers: make state_dict() non-destructive
            m.__class__ = SafeLinear4bit
    out, seen, dropped = {}, {}, []
    for key, t in model.state_dict().items():
        ident = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            dropped.append(key)
            continue
        seen[ident] = key
        out[key] = (replace or {}).get(key, t).detach().to("cpu").contiguous()
    return out, dropped


def _skip_entry_matches(entry: str, name: str) -> bool:
    """True if any loader's reading of an llm_int8_skip_modules entry would skip `name`.

    transformers 5.x matches an entry as a regex from the start up to a module boundary, or as a
    suffix; older releases matched it as a substring. "model.layers.1." matches
    "model.layers.10.mlp" under the first and third reading: that is the trap.
    """
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        if not should_convert_module(name, [entry]):
            return True
    except ImportError:  # pragma: no cover - other transformers versions
        pass
    return entry in name or name.endswith(entry)


def hf_skip_modules(model: nn.Module, quantized: set[str]) -> list[str]:
    """llm_int8_skip_modules naming every full-precision linear by its full name, verified.

    Full leaf names cannot be a prefix, suffix or substring of another module's name, so no
    quantized module is skipped by accident; the check below proves it for this model.
    """
    linears = get_adapter(model).full_precision_linears(model)
    skip = sorted(n for n in linears if n not in quantized)
    for name in quantized:
        hits = [e for e in skip if _skip_entry_matches(e, name)]
        if hits:
            raise MiOptError(f"internal: skip entries {hits} would also skip quantized module {name}")
    return skip


def _hf_quantization_config(model: nn.Module, mods: dict[str, tuple[int, str | None]],
                            int8_threshold: float | None) -> dict | None:
    """A BitsAndBytesConfig dict plain transformers can load this model with, or None if none exists."""
    from transformers import BitsAndBytesConfig

    if not mods or len({b for b, _ in mods.values()}) != 1 or len({t for _, t in mods.values()}) != 1:
        return None  # mixed widths or 4-bit formats: only mi-opt's loader rebuilds them
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    if names.get(id(adapter.lm_head())) in mods:
        return None  # transformers keeps lm_head full precision; a quantized one needs mi-opt's loader
    modules = {n: model.get_submodule(n) for n in mods}
    if not adapter.transformers_reloads_quantized:
        return None  # e.g. converted GPT-2 projections: not a layout transformers promises to reload
    bits, quant_type = next(iter(mods.values()))
    skip = hf_skip_modules(model, set(mods))
    if bits == 8:
        cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=int8_threshold,
                                 llm_int8_skip_modules=skip)
    else:
        if any(m.weight.blocksize != BLOCKSIZE for m in modules.values()):
            return None
        dtypes = {m.compute_dtype for m in modules.values()}
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=False,
                                 bnb_4bit_compute_dtype=dtypes.pop() if len(dtypes) == 1 else None,
                                 llm_int8_skip_modules=skip)
    return cfg.to_dict()


def model_int8_threshold(model: nn.Module) -> float | None:
    """The outlier threshold shared by the model's int8 modules (None without any); mixed is an error."""
    values = {float(m.state.threshold) for m in model.modules() if isinstance(m, _bnb().nn.Linear8bitLt)}
    if len(values) > 1:
        raise MiOptError(f"int8 modules with different outlier thresholds {sorted(values)}: one checkpoint "
                         "records one threshold, so quantize every int8 module with the same int8_threshold")
    return values.pop() if values else None


def save_quantized(model: nn.Module, out_dir, replace: dict[str, torch.Tensor] | None = None) -> dict:
    """Write out_dir/model.safetensors (canonical bnb layout); return the sidecar metadata.

    replace: state-dict key -> tensor to store instead (the export's unquantized weights in bf16).

    metadata["loader"] is "transformers" when `quantization_config` (put it in config.json under
    that key) lets plain `AutoModelForCausalLM.from_pretrained` rebuild the model, else "mi_opt".
    """
    from pathlib import Path

    from safetensors.torch import save

    from mi_opt.artifacts import atomic_write_bytes

    mods = quantized_modules(model)
    threshold = model_int8_threshold(model)  # raises on mixed thresholds, before anything is written
    tensors, tied = _state_dict_for_saving(model, replace)
    atomic_write_bytes(Path(out_dir) / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    hf_config = _hf_quantization_config(model, mods, threshold)
    four_bit = {n: t for n, (b, t) in mods.items() if b == 4}
    types = set(four_bit.values())
    return {"backend": "bitsandbytes", "weights": WEIGHTS_FILE,
            "modules": {n: b for n, (b, _) in mods.items()},
            "quant_type": types.pop() if len(types) == 1 else ("mixed" if types else None),
            "module_quant_types": four_bit, "int8_threshold": threshold, "tied_not_saved": tied,
            "loader": "transformers" if hf_config is not None or not mods else "mi_opt",
            "quantization_config": hf_config}


def _load_into(shell: nn.Module, tensors: dict[str, torch.Tensor], width: int, name: str) -> None:
    bnb = _bnb()
    if "weight" not in tensors:
        raise MiOptError(f"the saved weights have no entry for quantized module {name}: wrong folder or metadata")
    device = shell.weight.device
    if width == 8:
        if "SCB" not in tensors:
            raise MiOptError(f"{name}: saved int8 weights lack their scales (SCB)")
        w = tensors["weight"].to(device)
        shell.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False, CB=w,
                                         SCB=tensors["SCB"].to(device))
    else:
        stats = {k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}
        shell.weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, device=device, module=shell)
    if "bias" in tensors:
        shell.bias = nn.Parameter(tensors["bias"].to(device), requires_grad=False)


def load_quantized_(model: nn.Module, out_dir, metadata: dict) -> None:
    """Turn the listed modules of a full-precision model (at post-surgery shapes) into bnb modules
    and load every saved weight. Raises MiOptError on any mismatch; nothing is silently left random."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(out_dir) / metadata.get("weights", WEIGHTS_FILE)
    if not path.is_file():
        raise MiOptError(f"{path} does not exist; point at a folder written by save_quantized")
    tensors = load_file(str(path))
    types = metadata.get("module_quant_types", {})
    for name, width in metadata["modules"].items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise MiOptError(f"quantized module {name} does not exist in the given model: rebuild it at the "
                             "post-surgery shapes (layers dropped, heads pruned) before loading") from None
        if not get_adapter(model).is_full_precision_linear(current):
            raise MiOptError(f"{name} is a {type(current).__name__}, expected a full-precision linear to replace")
        # Exports before the threshold became 6.0 recorded 0.0; an absent value means no int8 module.
        shell = empty_bnb_module(_as_linear(model, current), width, types.get(name, metadata.get("quant_type") or "nf4"),
                                 metadata.get("int8_threshold") or 0.0)
        prefix = name + "."  # a full leaf name: no other module's keys start with it
        _load_into(shell, {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)},
                   width, name)
        shell.source_cls = type(current)
        model.set_submodule(name, shell.eval())
    from mi_opt.quant.base import load_remaining_  # here: mi_opt.quant imports this module at load time

    load_remaining_(model, tensors, metadata, path)
