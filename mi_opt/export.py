"""Write a compressed model as a checkpoint, verify it reloads identically, and load it back.

Layer-dropped, uniformly head- or neuron-pruned and uniformly quantized models load with plain
`AutoModelForCausalLM.from_pretrained`; per-layer head counts or MLP sizes and mixed bit widths
need `load_compressed`, which rebuilds the shapes from the sidecar (mi-opt-compression.json;
mi_opt.checkpoint_shapes) before loading the weights, the way PEFT adapters are rebuilt. LoRA
adapters a heal kept unmerged are written beside the weights in PEFT's format (`adapter/`) and
applied on load.

Weights that stay unquantized are stored in bf16 by default (dtype="auto"): a model computing in
fp32 is stored at half the bytes, one computing in fp16 or bf16 keeps its own dtype. The loaded
model cannot say what dtype its source file had (transformers records the dtype it loaded at), and
the bundled models come from GGUF files whose dequantized weights fit neither 16-bit type exactly,
so bf16, which keeps fp32's range, is the default; dtype="fp32" stores what is in memory. The reload
check compares against the in-memory model run with its weights rounded to the stored dtype, so it
stays exact; `format="gguf"` writes a llama.cpp file instead (mi_opt.formats.gguf).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from mi_opt import tmpfiles
from mi_opt.adapters import ADAPTER_DIR, load_adapters_, save_adapters, set_aside
from mi_opt.arch import get_adapter, is_quantized
from mi_opt.artifacts import read_json, versions, write_json
from mi_opt.card import model_card
from mi_opt.checkpoint_shapes import loader_reason, rebuild_shapes_
from mi_opt.errors import MiOptError
from mi_opt.handle import LoadedModel, ModelInfo, bare
from mi_opt.plan import CompressionPlan
from mi_opt.units import in_layers

SIDECAR = "mi-opt-compression.json"
SCHEMA = "mi-opt/compression"
VERSION = 2  # 2: per-layer mlp_sizes (a version 1 sidecar: every MLP as its config says)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
FORMATS = ("safetensors", "gguf")


def has_quantized_modules(model: nn.Module) -> bool:
    return any(is_quantized(m) for m in model.modules())


def describe(model: nn.Module) -> dict:
    """The shapes a loader must rebuild: layers, (query, KV) heads and MLP sizes per layer."""
    return ModelInfo.of(model, fingerprint="unhashed").shape()  # a shape needs no hash of the weights


def check_layers_left(model: nn.Module, plan: CompressionPlan, applied_by: str = "apply_") -> None:
    """The model has the layers the plan leaves (`applied_by`: the function that should have made it)."""
    n0 = plan.model.get("n_layers")
    n = get_adapter(model).n_layers()
    if n0 is not None and n != n0 - len(plan.drop_layers):
        raise MiOptError(f"the model has {n} layers but the plan leaves {n0 - len(plan.drop_layers)}: "
                         f"export the model returned by {applied_by}(model, plan)")


def _check_model_matches_plan(model: nn.Module, plan: CompressionPlan) -> None:
    check_layers_left(model, plan)
    kept_bits = [b for k, b in plan.bits.items() if not in_layers(k, plan.drop_layers)]
    if any(b < 16 for b in kept_bits) and not has_quantized_modules(model):
        raise MiOptError("the plan quantizes modules but the model has no quantized modules: run apply_ first")


def probe_ids(model: nn.Module) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    device = get_adapter(model).input_device()
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)


def storage_dtype(model: nn.Module, dtype: str | torch.dtype = "auto") -> torch.dtype:
    """The dtype unquantized weights are stored in: "auto" is bf16 for an fp32 model, else its own dtype."""
    from mi_opt.models import resolve_dtype

    compute = next(model.parameters()).dtype
    if dtype == "auto":
        return torch.bfloat16 if compute == torch.float32 else compute
    return resolve_dtype(dtype)


def stored_parameters(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every float parameter outside quantized modules, as stored (rounded to dtype) and computed
    with again (back in its own dtype); tied parameters appear once, under their first name."""
    skip = {n for n, m in model.named_modules() if is_quantized(m)}  # their tensors are stored as they are
    out = {}
    for name, p in model.named_parameters():
        if p.is_floating_point() and name.rpartition(".")[0] not in skip and p.dtype != dtype:
            out[name] = p.detach().to(dtype).to(p.dtype)
    return out


def reference_logits(model: nn.Module, ids: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits with `params` (name -> tensor) in place of its own, leaving it unchanged."""
    from torch.func import functional_call

    with torch.inference_mode():
        return functional_call(model, params, (ids,), {"use_cache": False}, tie_weights=True).logits.float()


def _verify(model: nn.Module, reloaded: nn.Module, where: Path, want: torch.Tensor | None = None) -> float:
    ids = probe_ids(model)
    reloaded = reloaded.to(ids.device)  # outside inference mode: torchao's tensors cannot be moved inside it
    with torch.inference_mode():
        want = model(ids, use_cache=False).logits.float() if want is None else want
        got = reloaded(ids, use_cache=False).logits.float()
    if got.shape != want.shape:
        raise MiOptError(f"export check failed: reloaded logits have shape {tuple(got.shape)}, expected "
                         f"{tuple(want.shape)}; nothing was written")
    diff = (got - want).abs().max().item()
    tol = TOLERANCE.get(next(model.parameters()).dtype, 1e-4) * max(1.0, want.abs().max().item())
    if not diff <= tol:
        raise MiOptError(f"export check failed: reloading {where.name} changes logits by up to {diff:.3g} "
                         f"(tolerance {tol:.3g}); nothing was written")
    return diff


def _stored_state_dict(model: nn.Module, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """The state dict with the `stored` parameters in the storage dtype; tied entries share one tensor."""
    by_ptr = {model.get_parameter(n).data_ptr(): t.to(dtype) for n, t in stored.items()}
    return {k: by_ptr.get(v.data_ptr(), v) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _write_checkpoint(model: nn.Module, tmp: Path, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> dict | None:
    """Weights + config into tmp; the quantization metadata, or None when nothing is quantized."""
    from mi_opt.quant import backend_of

    meta = None
    backend = backend_of(model) if has_quantized_modules(model) else None
    if backend is None:
        model.save_pretrained(tmp, state_dict=_stored_state_dict(model, stored, dtype))
    else:  # the backend whose modules the model holds writes them (mi_opt/quant/)
        meta = backend.save(model, tmp, {n: t.to(dtype) for n, t in stored.items()})
        model.config.save_pretrained(tmp)
    path = tmp / "config.json"
    cfg = json.loads(path.read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")  # the stored dtype, what from_pretrained(dtype="auto") loads
    if meta and meta.get("quantization_config"):
        cfg["quantization_config"] = meta["quantization_config"]
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return meta


def _reload(tmp: Path, sidecar: dict, model: nn.Module) -> nn.Module:
    """The checkpoint loaded the way its card says: load_compressed, or plain transformers (plus
    peft for kept adapters)."""
    from transformers import AutoModelForCausalLM

    compute = next(model.parameters()).dtype  # stored 16-bit weights upcast exactly to an fp32 model's dtype
    if sidecar["loader"] != "transformers":  # the model's own attention kernel: sdpa and eager differ in last bits
        return load_compressed(tmp, dtype=compute, attn_implementation=model.config._attn_implementation)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=compute, trust_remote_code=False,
                                                    attn_implementation=model.config._attn_implementation)
    if sidecar.get("adapters"):
        load_adapters_(reloaded, tmp / ADAPTER_DIR)
    return reloaded.eval()


def _through_adapters(stored: dict[str, torch.Tensor], adapters: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Parameter names taken with the adapters set aside, as they read with the adapters in place
    (`q_proj.weight` is then `q_proj.base_layer.weight`)."""
    renamed = {}
    for name, tensor in stored.items():
        owner, _, leaf = name.rpartition(".")
        renamed[f"{owner}.base_layer.{leaf}" if owner in adapters else name] = tensor
    return renamed


def export(model: nn.Module | LoadedModel, tokenizer, plan: CompressionPlan, out_dir: str | Path, profile=None,
           eval_results: dict | None = None, force: bool = False, heal=None, dtype: str | torch.dtype = "auto",
           format: str = "safetensors", gguf=None, gguf_applied=None) -> Path:
    """Write the compressed `model` (bare or a handle) to out_dir atomically, verified by a reload;
    returns out_dir.

    heal: the HealRecord when the model was healed after compression (shipped as heal.json).
    dtype: the dtype of unquantized weights on disk ("auto": bf16 for an fp32 model, see above).
    format: "safetensors" (transformers / mi-opt checkpoint) or "gguf" (one .gguf for llama.cpp,
    written by mi_opt.formats.gguf from the unquantized model; gguf: its GgufOptions; gguf_applied:
    apply_gguf_'s record when the model already holds the GGUF weights, so GPTQ is not run twice)."""
    model = bare(model)
    if format not in FORMATS:
        raise MiOptError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    _check_backend_format(plan, format, gguf)
    out = Path(out_dir)
    if out.exists() and not force:
        raise MiOptError(f"{out} already exists; choose another folder or pass force=True (--force) to replace it")
    if out.exists() and not out.is_dir():
        raise MiOptError(f"{out} exists and is not a folder")
    if format == "gguf":
        from mi_opt.adapters import lora_layers
        from mi_opt.formats.gguf import export_gguf

        if lora_layers(model):
            raise MiOptError("a GGUF file cannot carry unmerged LoRA adapters: heal with heal.adapters 'merge' "
                             "to export GGUF, or export safetensors")

        return export_gguf(model, tokenizer, plan, out, gguf, profile=profile, eval_results=eval_results, heal=heal,
                           applied=gguf_applied)
    _check_model_matches_plan(model, plan)
    dtype = storage_dtype(model, dtype)
    with staging(out) as tmp:
        with set_aside(model) as adapters:  # the weights as before healing; kept adapters beside them
            stored = stored_parameters(model, dtype)
            quant = _write_checkpoint(model, tmp, stored, dtype)
            shapes = describe(model)
        # what the reload must compute: stored weights as rounded, adapters (saved as they are) on top
        want = reference_logits(model, probe_ids(model), _through_adapters(stored, adapters))
        del stored
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        sidecar = {"schema": SCHEMA, "version": VERSION, **shapes, "quantization": quant,
                   "source": plan.model, "versions": versions()}
        sidecar["dtype"] = str(dtype).removeprefix("torch.")  # as stored; load_compressed builds the model in it
        if adapters:
            sidecar["adapters"] = {"path": ADAPTER_DIR, "format": "peft-lora",
                                   **save_adapters(model, tmp / ADAPTER_DIR)}
        reason = loader_reason(model, shapes, quant)
        sidecar["loader"] = "transformers" if reason is None else "mi_opt"
        sidecar["loader_reason"] = reason
        write_json(tmp / SIDECAR, sidecar)  # load_compressed reads it during the check
        reloaded = _reload(tmp, sidecar, model)
        sidecar["verified_max_logit_diff"] = _verify(model, reloaded, out, want)
        del reloaded
        write_json(tmp / SIDECAR, sidecar)
        finish(tmp, out, plan, model_card(plan, sidecar, eval_results, heal), profile, heal)
    return out


def _check_backend_format(plan: CompressionPlan, format: str, gguf=None) -> None:
    """A plan's quantization backend is written by the export formats it declares. bitsandbytes plans
    may still be exported as GGUF (the GGUF writer re-quantizes from the unquantized weights; such a
    plan's damage was measured with bitsandbytes, what recipes did before the gguf backend existed)."""
    from mi_opt.quant import get_backend

    if not any(b < 16 for b in plan.bits.values()):
        return
    backend = get_backend(plan.backend)
    if format not in backend.export_formats and not (format == "gguf" and plan.backend == "bitsandbytes"):
        raise MiOptError(f"the plan quantizes with backend {plan.backend}, which export format {format} does not "
                         f"carry; export it as {' or '.join(backend.export_formats)} (or plan for another backend)")
    if format == "gguf" and plan.backend == "gguf":
        from mi_opt.formats.gguf_types import GgufOptions
        from mi_opt.quant import QuantOptions

        bad = backend.written_mismatch((gguf or GgufOptions()).mapping(), {b for b in plan.bits.values() if b < 16},
                                       QuantOptions.of(plan))
        if bad:
            width, measured, written = bad
            raise MiOptError(f"the plan's {width}-bit modules were measured as {measured}, but the GGUF export "
                             f"would write {written}: set export.gguf.types {{{width}: {measured}}}"
                             + (f" (or plan with quant_type {written})" if width == 4 else ""))


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary folder next to out for an export to fill; removed with all it holds if the export fails."""
    tmp = tmpfiles.make_dir(out.parent, out.name)  # also clears what killed exports left
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finish(tmp: Path, out: Path, plan: CompressionPlan, card: str, profile=None, heal=None) -> None:
    """Add the plan, profile, heal record and card to a verified tmp folder and rename it to out."""
    plan.save(tmp / "plan.json")
    if profile is not None:
        profile.save(tmp / "profile.json")
    if heal is not None:
        heal.save(tmp / "heal.json")
    (tmp / "README.md").write_text(card)
    tmpfiles.apply_umask(tmp)
    _replace(tmp, out)


def _replace(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out (force) is moved aside first and deleted only after."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=tmpfiles.prefix(out.name, "old"), dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _load_weights_(model: nn.Module, folder: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mi_opt.models import corrupt_weights

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for name in files:
        try:
            state.update(load_file(str(folder / name)))
        except SafetensorError as err:
            raise corrupt_weights(folder, err) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise MiOptError(f"{folder} does not fit the rebuilt model: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()


def load_compressed(path: str | Path, device: str = "cpu", attn_implementation: str | None = None,
                    dtype: str | torch.dtype | None = None) -> nn.Module:
    """Load any mi-opt export: rebuild the per-layer shapes the sidecar records, then the weights.

    dtype: compute in this dtype instead of the stored one (e.g. fp32 for a bf16 export).

    An export never needs custom modeling code, so a folder's auto_map is never run (trust_remote_code=False).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    folder = Path(path)
    if not (folder / SIDECAR).is_file():
        if not (folder / "config.json").is_file():
            raise MiOptError(f"{folder} is not a model folder (no config.json)")
        from safetensors import SafetensorError

        from mi_opt.models import corrupt_weights

        try:
            return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation,
                                                        dtype=dtype or "auto", trust_remote_code=False).to(device).eval()
        except SafetensorError as err:
            raise corrupt_weights(folder, err) from None
    sidecar = read_json(folder / SIDECAR, SCHEMA, VERSION)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # quantized modules are rebuilt below, module by module
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with no_init_weights():  # every weight is overwritten from the checkpoint
        from mi_opt.models import resolve_dtype

        want = resolve_dtype(dtype) if dtype is not None else getattr(torch, sidecar["dtype"])
        model = AutoModelForCausalLM.from_config(config, dtype=want, **kwargs)
    if get_adapter(model).n_layers() != sidecar["n_layers"]:
        raise MiOptError(f"{folder}: config.json builds {get_adapter(model).n_layers()} layers but the sidecar "
                         f"records {sidecar['n_layers']}; the folder was edited by hand")
    rebuild_shapes_(model, sidecar)  # per-layer heads and MLP sizes, before the weights go in
    model.to(device)
    if sidecar.get("quantization"):
        from mi_opt.quant import get_backend  # exports before backends existed were all bitsandbytes

        get_backend(sidecar["quantization"].get("backend", "bitsandbytes")).load_(model, folder, sidecar["quantization"])
        model.tie_weights()  # a tied lm_head is not saved: share the loaded embedding again
    else:
        _load_weights_(model, folder)
    if sidecar.get("adapters"):
        load_adapters_(model, folder / sidecar["adapters"]["path"])
    return model.eval()
