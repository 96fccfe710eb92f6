"""`export(..., format="gguf")`: one .gguf file for llama.cpp whose tensor types follow the plan.

The GGUF file is quantized here, from the unquantized weights, by the `gguf` package's own
quantizers (the ones llama.cpp's conversion script uses), so the model must come from
`apply_structure_(model, plan)`: layers dropped, heads and MLP neurons pruned, no bitsandbytes modules
(re-quantizing nf4 weights into Q4_0 would round twice).

Nothing is written unless the whole file can be: every refusal (family, per-layer shapes, a type
the writer lacks, rows that do not split into blocks, no tokenizer metadata) comes first. The
file is verified before it is renamed into place: transformers loads it (`gguf_file=`) and its
logits are compared with the in-memory model run on the very weights the file holds, dequantized.

Tokenizer metadata: llama.cpp tokenizes with its own reimplementation, told which pre-tokenizer
by name (`tokenizer.ggml.pre`), a name the conversion script finds by hashing the HF tokenizer's
output against its table. mi-opt does not guess it: the tokenizer.* fields are copied from a
GGUF file with the same vocabulary: the source model's own when it is one (the bundled models
are), or `GgufOptions.vocab_from`. An export without a tokenizer (tokenizer=None) says
`tokenizer.ggml.model = "none"`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mi_opt.arch import get_adapter
from mi_opt.artifacts import versions, write_json
from mi_opt.errors import MiOptError
from mi_opt.formats.gguf_families import gguf_family, permute_rows
from mi_opt.formats.gguf_types import GgufOptions, tensor_types
from mi_opt.plan import CompressionPlan

# Descriptive general.* keys carried over from a source GGUF with the tokenizer; the size label is not
# (dropped layers change the size) and the rest describe this file, so they are written anew.
COPIED_GENERAL = ("general.license", "general.organization", "general.basename", "general.finetune",
                  "general.languages")
TOLERANCE = 1e-4  # relative to the largest logit: both sides compute in fp32 on identical weights


def apply_structure_(model: nn.Module, plan: CompressionPlan) -> nn.Module:
    """Drop layers and prune heads and MLP neurons as the plan says, leaving every weight unquantized for
    the GGUF writer."""
    from mi_opt.surgery import apply_

    return apply_(model, replace(plan, bits={}))


def _check_model(model: nn.Module, plan: CompressionPlan) -> None:
    from mi_opt.export import check_layers_left, has_quantized_modules

    if has_quantized_modules(model):
        raise MiOptError("GGUF export quantizes from unquantized weights, but this model already holds "
                         "bitsandbytes modules: apply the plan with mi_opt.formats.gguf.apply_structure_(model, plan) "
                         "instead of apply_ (mi-opt apply --format gguf does)")
    check_layers_left(model, plan, "apply_structure_")


def source_gguf(spec: str) -> Path | None:
    """The GGUF file model `spec` is loaded from, if it is one (a bundled name or a .gguf path)."""
    from mi_opt.models import BUNDLED

    if spec in BUNDLED:
        return BUNDLED[spec].locate_gguf()
    path = Path(spec).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def vocab_path(spec: str, options: GgufOptions) -> Path:
    """The GGUF file whose tokenizer metadata an export of model `spec` copies, or the refusal."""
    path = Path(options.vocab_from).expanduser() if options.vocab_from else source_gguf(spec)
    if path is None:
        raise MiOptError("GGUF export needs the tokenizer as llama.cpp reads it (tokenizer.ggml.* metadata), and "
                         f"the source {spec!r} is not a GGUF file: convert its tokenizer once with "
                         "llama.cpp's `convert_hf_to_gguf.py --vocab-only` and pass that file as "
                         "GgufOptions(vocab_from=...) (--gguf-vocab, recipe export.gguf.vocab_from), "
                         "or export without a tokenizer")
    if not path.is_file():
        raise MiOptError(f"GGUF vocabulary file {path} does not exist")
    return path


def check_gguf_export(model: nn.Module, spec: str, options: GgufOptions) -> None:
    """What export_gguf would refuse about this model and its tokenizer source, checked before any work
    (what a plan would leave: `check_plan_mlp_sizes`, once the plan exists)."""
    options.mapping()
    gguf_family(model).check(model)
    vocab_path(spec, options)


def _vocab_fields(tokenizer, plan: CompressionPlan, options: GgufOptions, vocab_size: int) -> list:
    """The tokenizer.* fields (and license, COPIED_GENERAL) to copy as GGUFReader fields, [] for no
    tokenizer; refusals first."""
    if tokenizer is None:
        return []
    import gguf

    path = vocab_path(str(plan.model.get("spec") or ""), options)
    fields = [f for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.") or k in COPIED_GENERAL]
    tokens = next((f for f in fields if f.name == "tokenizer.ggml.tokens"), None)
    if tokens is None or len(tokens.data) != vocab_size:
        found = "no token list" if tokens is None else f"{len(tokens.data)} tokens"
        raise MiOptError(f"{path} has {found} but the model's embedding has {vocab_size} rows: the vocabulary must "
                         "be the model's own")
    return fields


def _quantized_tensors(model: nn.Module, types: dict[str, str], family) -> tuple[list, dict[str, torch.Tensor]]:
    """[(gguf name, bytes, GGML type)] in file order, and name -> the dequantized weight (HF layout)."""
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.arch), get_adapter(model).n_layers())
    unmapped = [n for n in types if names.get_name(n, try_suffixes=(".weight", ".bias")) is None]
    if unmapped:
        raise MiOptError(f"GGUF export: llama.cpp has no tensor for {unmapped[:3]}; use the safetensors export")
    tensors, dequantized = [], {}
    for name, p in tqdm(list(model.named_parameters()), desc="quantizing for GGUF", leave=False):
        qtype = gguf.GGMLQuantizationType[types[name]]
        # Blocks run along rows, so quantizing commutes with llama.cpp's row permutation: quantize in
        # HF order (the reference the check uses, independent of the permutation), then permute the packed rows.
        packed, dequantized[name] = ggml_round_trip(p, qtype)
        heads = family.row_heads(model, name)
        if heads is not None:
            packed = permute_rows(packed, heads)
        tensors.append((names.get_name(name, try_suffixes=(".weight", ".bias")), packed, qtype))
    return tensors, dequantized


def ggml_round_trip(p: torch.Tensor, qtype) -> tuple[np.ndarray, torch.Tensor]:
    """(the packed GGML bytes of a weight, the weight they dequantize to, in its own dtype and device)."""
    import gguf

    data = p.detach().to("cpu", torch.float32).numpy()
    packed = gguf.quants.quantize(data, qtype)
    back = gguf.quants.dequantize(packed, qtype).reshape(data.shape)
    return packed, torch.from_numpy(np.ascontiguousarray(back)).to(p.device, p.dtype)


def gptq_for_gguf_(model: nn.Module, types: dict[str, str], options: GgufOptions, tokenizer,
                   progress: bool = True) -> dict[str, str]:
    """With options.quantizer "gptq": the Q4_0 / Q5_0 weights replaced in place by their GPTQ
    quantization (or round-to-nearest, where GPTQ lost on held-out windows), on the grid the writer
    reproduces exactly; parameter name -> "gptq" or "rtn" for those weights."""
    if options.quantizer != "gptq":
        return {}
    if tokenizer is None:
        raise MiOptError("gguf quantizer gptq needs the tokenizer, to read its calibration windows")
    from mi_opt.data import token_windows
    from mi_opt.quant.gptq import gptq_

    context = get_adapter(model).max_positions() or 256
    windows = token_windows(tokenizer, "handbook", options.calibration_windows, min(256, context), split="calibration")
    return gptq_(model, types, windows, progress=progress)


@dataclass(frozen=True)
class GgufWeights:
    """What apply_gguf_ put in a model: parameter name -> GGML type, and for the Q4_0 / Q5_0
    weights under quantizer gptq, name -> "gptq" or "rtn" (which quantizer each one kept)."""

    types: dict[str, str]
    quantizer: str
    quantizer_choice: dict[str, str]


def apply_gguf_(model: nn.Module, plan: CompressionPlan, options: GgufOptions | None = None,
                tokenizer=None) -> GgufWeights:
    """apply_structure_, then every weight replaced in place by what the GGUF file will hold, dequantized,
    so that evaluating the model measures what ships.

    Exporting the result quantizes each weight again at the same type, which gives the same weights:
    every block's scale (and minimum) is recomputed exactly from its own dequantized values. The only
    byte that can change is the sign of an all-zero block's zero scale in Q4_0 / Q5_0 (-0.0 -> +0.0).
    Pass the returned record to export_gguf (`applied`) so it writes these weights as they are
    rather than running GPTQ a second time."""
    import gguf

    options = options or GgufOptions()
    apply_structure_(model, plan)
    gguf_family(model).check(model)
    types = tensor_types(model, plan, options)
    chosen = gptq_for_gguf_(model, types, options, tokenizer)
    with torch.no_grad():
        for name, p in tqdm(list(model.named_parameters()), desc="GGUF-quantizing", leave=False):
            if types[name] != "F32" or p.dtype != torch.float32:
                p.copy_(ggml_round_trip(p, gguf.GGMLQuantizationType[types[name]])[1])
    return GgufWeights(types, options.quantizer, chosen)


def _file_type(types: dict[str, str]):
    """general.file_type: the type most matrix weights have (llama.cpp shows it as the file's kind)."""
    import gguf

    counts = Counter(t for t in types.values() if t != "F32")
    main = counts.most_common(1)[0][0] if counts else "F32"
    return gguf.LlamaFileType.ALL_F32 if main == "F32" else gguf.LlamaFileType[f"MOSTLY_{main}"]


def _write(path: Path, model: nn.Module, family, tensors: list, vocab: list, types: dict[str, str],
           mapping: dict[int, str], plan: CompressionPlan) -> None:
    import json

    import gguf

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"{plan.model.get('spec') or 'model'} (mi-opt)")
    family.metadata(writer, model)
    writer.add_file_type(_file_type(types))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if vocab:
        for field in vocab:
            main = field.types[0]
            writer.add_key_value(field.name, field.contents(), main,
                                 sub_type=field.types[-1] if main == gguf.GGUFValueType.ARRAY else None)
    if not any(f.name.startswith("tokenizer.") for f in vocab):
        writer.add_tokenizer_model("none")
    # What mi-opt did, for people and tools reading the file; llama.cpp ignores unknown keys.
    writer.add_string("mi_opt.bits_to_ggml", json.dumps({str(k): v for k, v in sorted(mapping.items())}))
    writer.add_string("mi_opt.plan.drop_layers", json.dumps(plan.drop_layers))
    for name, packed, qtype in tensors:
        writer.add_tensor(name, packed, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _verify(model: nn.Module, folder: Path, file_name: str, dequantized: dict[str, torch.Tensor]) -> float:
    from transformers import AutoModelForCausalLM

    from mi_opt.export import probe_ids, reference_logits

    ids = probe_ids(model)
    want = reference_logits(model, ids, dequantized)
    compute = next(model.parameters()).dtype
    reloaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=compute,
                                                    attn_implementation=model.config._attn_implementation).eval()
    with torch.inference_mode():
        got = reloaded.to(ids.device)(ids, use_cache=False).logits.float()
    if got.shape != want.shape:
        raise MiOptError(f"GGUF export check failed: transformers reads logits of shape {tuple(got.shape)}, "
                         f"expected {tuple(want.shape)}; nothing was written")
    diff = (got - want).abs().max().item()
    tol = TOLERANCE * max(1.0, want.abs().max().item())
    if not diff <= tol:
        raise MiOptError(f"GGUF export check failed: transformers' reading of {file_name} changes logits by up to "
                         f"{diff:.3g} (tolerance {tol:.3g}); nothing was written")
    return diff


def _check_applied(model: nn.Module, applied: GgufWeights, options: GgufOptions, types: dict[str, str],
                   dequantized: dict[str, torch.Tensor]) -> None:
    """The model holds what `applied` says: the same types, and GPTQ's weights on their own grid."""
    if applied.quantizer != options.quantizer:
        raise MiOptError(f"GGUF export: the model holds {applied.quantizer} weights but the export's options say "
                         f"quantizer {options.quantizer}; export with the options apply_gguf_ used")
    if applied.types != types:
        raise MiOptError("GGUF export: the model was quantized with other tensor types than this export's options "
                         "give; export with the options apply_gguf_ used")
    params = dict(model.named_parameters())
    moved = [n for n, how in applied.quantizer_choice.items() if how == "gptq" and not torch.equal(
        dequantized[n].abs(), params[n].detach().abs())]  # |x|: an all-zero block's scale may flip sign
    if moved:
        raise MiOptError(f"GGUF export: {moved[0]} is marked as GPTQ-quantized but its weights are not on their "
                         "GGML grid (they changed after apply_gguf_); apply the plan again before exporting")


def export_gguf(model: nn.Module, tokenizer, plan: CompressionPlan, out: Path, options: GgufOptions | None = None,
                profile=None, eval_results: dict | None = None, heal=None, applied: GgufWeights | None = None) -> Path:
    """Write out/<options.file_name> (+ plan, sidecar, card) atomically, verified by a transformers reload.

    applied: apply_gguf_'s record when `model` already holds the GGUF weights (a recipe evaluates
    them before it exports): they are written as they are, and a GPTQ weight that does not come
    back unchanged from its own quantization is refused, since it cannot be GPTQ's output."""
    from mi_opt.export import SCHEMA, SIDECAR, VERSION, describe, finish, staging

    options = options or GgufOptions()
    _check_model(model, plan)
    family = gguf_family(model)
    family.check(model)
    mapping = options.mapping()
    types = tensor_types(model, plan, options)
    vocab = _vocab_fields(tokenizer, plan, options, get_adapter(model).embedding().weight.shape[0])
    chosen = applied.quantizer_choice if applied is not None else {}
    if options.quantizer == "gptq" and applied is None:  # on a copy: the caller's model stays as given
        import copy

        model = copy.deepcopy(model)
        chosen = gptq_for_gguf_(model, types, options, tokenizer)
    with staging(out) as tmp:
        tensors, dequantized = _quantized_tensors(model, types, family)
        if applied is not None:
            _check_applied(model, applied, options, types, dequantized)
        _write(tmp / options.file_name, model, family, tensors, vocab, types, mapping, plan)
        del tensors
        diff = _verify(model, tmp, options.file_name, dequantized)
        del dequantized
        counts = dict(Counter(types.values()))
        sidecar = {"schema": SCHEMA, "version": VERSION, **describe(model), "format": "gguf",
                   "gguf": {"file": options.file_name, "bytes": (tmp / options.file_name).stat().st_size,
                            "bits_to_ggml": {str(k): v for k, v in sorted(mapping.items())},
                            "quantizer": options.quantizer,
                            "gptq_kept": sorted(n for n, how in chosen.items() if how == "gptq") if chosen else None,
                            "tensor_types": types, "type_counts": counts,
                            "tokenizer": "copied" if vocab else "none", "architecture": family.arch.lower()},
                   "quantization": None, "loader": "llama.cpp", "loader_reason": None,
                   "source": plan.model, "versions": versions(), "verified_max_logit_diff": diff}
        write_json(tmp / SIDECAR, sidecar)
        from mi_opt.formats.gguf_card import gguf_card

        finish(tmp, out, plan, gguf_card(plan, sidecar, eval_results, heal), profile, heal)
    return out
