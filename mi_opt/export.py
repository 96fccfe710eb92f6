"""Write a compressed model as a checkpoint, verify it reloads identically, and load it back.

Layer-dropped, uniformly head-pruned and uniformly quantized models load with plain
`AutoModelForCausalLM.from_pretrained`; per-layer head counts and mixed bit widths need
`load_compressed`, which rebuilds the shapes from the sidecar (mi-opt-compression.json)
before loading the weights, the way PEFT adapters are rebuilt. LoRA adapters a heal kept
unmerged are written beside the weights in PEFT's format (`adapter/`) and applied on load.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from mi_opt import tmpfiles
from mi_opt.adapters import ADAPTER_DIR, load_adapters_, save_adapters, set_aside
from mi_opt.arch import get_adapter
from mi_opt.artifacts import read_json, versions, write_json
from mi_opt.card import model_card
from mi_opt.errors import MiOptError
from mi_opt.handle import LoadedModel, ModelInfo, bare
from mi_opt.plan import CompressionPlan
from mi_opt.units import in_layers

SIDECAR = "mi-opt-compression.json"
SCHEMA = "mi-opt/compression"
VERSION = 1
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _quantized_modules(model: nn.Module) -> bool:
    return any(c.__module__.startswith("bitsandbytes") for m in model.modules() for c in type(m).__mro__)


def _head_loader(model: nn.Module, heads: list[tuple[int, int]]) -> str | None:
    """Why plain transformers cannot rebuild these head shapes, or None if it can."""
    return get_adapter(model).head_shapes_unloadable(heads)


def describe(model: nn.Module) -> dict:
    """The shapes a loader must rebuild: layers and (query, KV) heads per layer."""
    return ModelInfo.of(model, fingerprint="unhashed").shape()  # a shape needs no hash of the weights


def _check_model_matches_plan(model: nn.Module, plan: CompressionPlan) -> None:
    n0 = plan.model.get("n_layers")
    n = get_adapter(model).n_layers()
    if n0 is not None and n != n0 - len(plan.drop_layers):
        raise MiOptError(f"the model has {n} layers but the plan leaves {n0 - len(plan.drop_layers)}: "
                         "export the model returned by apply_(model, plan)")
    kept_bits = [b for k, b in plan.bits.items() if not in_layers(k, plan.drop_layers)]
    if any(b < 16 for b in kept_bits) and not _quantized_modules(model):
        raise MiOptError("the plan quantizes modules but the model has no quantized modules: run apply_ first")


def _probe_ids(model: nn.Module) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    device = get_adapter(model).input_device()
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)


def _verify(model: nn.Module, reloaded: nn.Module, where: Path) -> float:
    ids = _probe_ids(model)
    with torch.inference_mode():
        want = model(ids, use_cache=False).logits.float()
        got = reloaded.to(ids.device)(ids, use_cache=False).logits.float()
    if got.shape != want.shape:
        raise MiOptError(f"export check failed: reloaded logits have shape {tuple(got.shape)}, expected "
                         f"{tuple(want.shape)}; nothing was written")
    diff = (got - want).abs().max().item()
    tol = TOLERANCE.get(next(model.parameters()).dtype, 1e-4) * max(1.0, want.abs().max().item())
    if not diff <= tol:
        raise MiOptError(f"export check failed: reloading {where.name} changes logits by up to {diff:.3g} "
                         f"(tolerance {tol:.3g}); nothing was written")
    return diff


def _write_checkpoint(model: nn.Module, tmp: Path) -> dict | None:
    """Weights + config into tmp; the quantization metadata, or None when nothing is quantized."""
    if not _quantized_modules(model):
        model.save_pretrained(tmp)
        return None
    from mi_opt.surgery.quantize import save_quantized  # optional backend, only for quantized models

    meta = save_quantized(model, tmp)
    model.config.save_pretrained(tmp)
    if meta.get("quantization_config"):
        path = tmp / "config.json"
        cfg = json.loads(path.read_text())
        cfg["quantization_config"] = meta["quantization_config"]
        path.write_text(json.dumps(cfg, indent=2) + "\n")
    return meta


def _reload(tmp: Path, sidecar: dict, model: nn.Module) -> nn.Module:
    """The checkpoint loaded the way its card says: load_compressed, or plain transformers (plus
    peft for kept adapters)."""
    if sidecar["loader"] != "transformers":
        return load_compressed(tmp)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=next(model.parameters()).dtype, trust_remote_code=False,
                                                    attn_implementation=model.config._attn_implementation)
    if sidecar.get("adapters"):
        load_adapters_(reloaded, tmp / ADAPTER_DIR)
    return reloaded.eval()


def export(model: nn.Module | LoadedModel, tokenizer, plan: CompressionPlan, out_dir: str | Path, profile=None,
           eval_results: dict | None = None, force: bool = False, heal=None) -> Path:
    """Write the compressed `model` (bare or a handle) to out_dir atomically, verified by a reload;
    returns out_dir.

    heal: the HealRecord when the model was healed after compression (shipped as heal.json)."""
    model = bare(model)
    out = Path(out_dir)
    if out.exists() and not force:
        raise MiOptError(f"{out} already exists; choose another folder or pass force=True (--force) to replace it")
    if out.exists() and not out.is_dir():
        raise MiOptError(f"{out} exists and is not a folder")
    _check_model_matches_plan(model, plan)
    tmp = tmpfiles.make_dir(out.parent, out.name)  # also clears what killed exports left
    try:
        with set_aside(model) as adapters:  # the weights as before healing; kept adapters beside them
            quant = _write_checkpoint(model, tmp)
            shapes = describe(model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        sidecar = {"schema": SCHEMA, "version": VERSION, **shapes, "quantization": quant,
                   "source": plan.model, "versions": versions()}
        if adapters:
            sidecar["adapters"] = {"path": ADAPTER_DIR, "format": "peft-lora",
                                   **save_adapters(model, tmp / ADAPTER_DIR)}
        reason = _head_loader(model, [tuple(h) for h in sidecar["heads"]])
        if reason is None and quant and quant.get("loader") != "transformers":
            reason = "mixed bit widths or a quantized lm_head"
        sidecar["loader"] = "transformers" if reason is None else "mi_opt"
        sidecar["loader_reason"] = reason
        write_json(tmp / SIDECAR, sidecar)  # load_compressed reads it during the check
        reloaded = _reload(tmp, sidecar, model)
        sidecar["verified_max_logit_diff"] = _verify(model, reloaded, out)
        del reloaded
        write_json(tmp / SIDECAR, sidecar)
        plan.save(tmp / "plan.json")
        if profile is not None:
            profile.save(tmp / "profile.json")
        if heal is not None:
            heal.save(tmp / "heal.json")
        (tmp / "README.md").write_text(model_card(plan, sidecar, eval_results, heal))
        tmpfiles.apply_umask(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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


def load_compressed(path: str | Path, device: str = "cpu", attn_implementation: str | None = None) -> nn.Module:
    """Load any mi-opt export: rebuild the per-layer shapes the sidecar records, then the weights.

    An export never needs custom modeling code, so a folder's auto_map is never run (trust_remote_code=False).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from mi_opt.surgery.heads import reshape_heads_

    folder = Path(path)
    if not (folder / SIDECAR).is_file():
        if not (folder / "config.json").is_file():
            raise MiOptError(f"{folder} is not a model folder (no config.json)")
        from safetensors import SafetensorError

        from mi_opt.models import corrupt_weights

        try:
            return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation,
                                                        trust_remote_code=False).to(device).eval()
        except SafetensorError as err:
            raise corrupt_weights(folder, err) from None
    sidecar = read_json(folder / SIDECAR, SCHEMA, VERSION)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # quantized modules are rebuilt below, module by module
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with no_init_weights():  # every weight is overwritten from the checkpoint
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, sidecar["dtype"]), **kwargs)
    if get_adapter(model).n_layers() != sidecar["n_layers"]:
        raise MiOptError(f"{folder}: config.json builds {get_adapter(model).n_layers()} layers but the sidecar "
                         f"records {sidecar['n_layers']}; the folder was edited by hand")
    reshape_heads_(model, [tuple(h) for h in sidecar["heads"]])
    model.to(device)
    if sidecar.get("quantization"):
        from mi_opt.surgery.quantize import load_quantized_

        load_quantized_(model, folder, sidecar["quantization"])
        model.tie_weights()  # a tied lm_head is not saved: share the loaded embedding again
    else:
        _load_weights_(model, folder)
    if sidecar.get("adapters"):
        load_adapters_(model, folder / sidecar["adapters"]["path"])
    return model.eval()
