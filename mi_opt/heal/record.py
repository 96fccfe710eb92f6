"""heal.json (what healing did, on what data, at what cost) and the healed weights it changed."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mi_opt import tmpfiles
from mi_opt.arch import get_adapter, is_quantized
from mi_opt.artifacts import JsonArtifact, now, versions
from mi_opt.errors import MiOptError

WEIGHTS = "healed.safetensors"


@dataclass
class HealRecord(JsonArtifact):
    SCHEMA = "mi-opt/heal"
    VERSION = 1

    config: dict                                        # HealConfig fields
    trained: dict = field(default_factory=dict)         # what trained: mode, layers/modules, parameter count
    blocks: list = field(default_factory=list)          # damaged sites as student blocks (mi_opt.heal.sites)
    data: dict = field(default_factory=dict)            # sources, windows, tokens (calibration split only)
    local: list = field(default_factory=list)           # per block: relative MSE before/after local repair
    distill: dict = field(default_factory=dict)         # loss history, steps, resumed-from step
    kl_to_teacher: dict = field(default_factory=dict)   # mean KL(teacher || student) on training windows
    changed: list = field(default_factory=list)         # parameter names whose values healing changed
    unhealed_fingerprint: str = ""                      # the compressed model it started from
    cost: dict = field(default_factory=dict)            # wall time per phase, tokens, peak memory
    versions: dict = field(default_factory=versions)
    created: str = field(default_factory=now)

    def summary(self) -> list[str]:
        """What healing trained, on what, at what cost, and how far it moved toward the original."""
        c, cost, kl, data, trained = self.config, self.cost, self.kl_to_teacher, self.data, self.trained
        near = f"the layers next to each damaged site (student layers {trained.get('layers')})"
        if trained["kind"] == "lora":
            if trained.get("adapters") == "kept":
                how = ("kept unmerged in `adapter/` (PEFT format) on top of the unchanged weights; "
                       "`load_compressed` or `PeftModel.from_pretrained(model, 'adapter')` applies them")
            elif trained.get("requantized"):
                how = "merged into the weights; quantized modules quantized again at their own width and format"
            else:
                how = "merged into the weights"
            what = f"LoRA adapters of rank {c['lora_rank']} on {len(trained.get('modules', []))} modules, {how}"
        else:
            what = {"localized": near, "local": near, "all": "every weight"}[trained["mode"]]
        lines = [f"Method `{c['method']}`: trained {what} ({trained.get('changed_parameters', 0):,} parameters).",
                 f"Data: {data.get('prose_windows', 0)} calibration windows of `{data.get('source')}` "
                 "(calibration split)"
                 + (f" and {data['self_generated_windows']} windows written by the original model"
                    if data.get("self_generated_windows") else "") + f", {data.get('seq_len')} tokens each; "
                 "never evaluation windows or task items."]
        if self.local:
            lines.append("Local repair, relative error of the residual stream after each block: "
                         + "; ".join(f"layers {b['layers'][0]}-{b['layers'][-1]} ({b['why']}): "
                                     f"{b['relative_mse_before']:.4f} -> {b['relative_mse_after']:.4f}"
                                     for b in self.local) + ".")
        if self.distill:
            lines.append(f"Distillation: {c['steps']} steps of {c['batch_size'] * c['grad_accum']} windows "
                         f"({cost['tokens']:,} tokens), forward KL at temperature {c['temperature']}"
                         + (f" + {c['hidden_weight']} x hidden-state matching" if c["hidden_weight"] else "")
                         + f", lr {c['lr']}" + (f"; resumed from step {self.distill['resumed_from_step']}"
                                                if self.distill.get("resumed_from_step") else "") + ".")
        lines.append(f"KL to the original on training windows: {kl['before']:.4f} -> {kl['after']:.4f} nats/token. "
                     f"Wall time {cost['wall_time_s']:.0f} s, peak memory {cost['peak_memory_mb']:.0f} MB.")
        return lines


def settled_fingerprint(model: nn.Module) -> str:
    """The model's fingerprint after one tiny forward. bitsandbytes' CPU 4-bit modules repack their
    weights (absmax rounded to bf16) at the first forward, which changes their saved state: the
    heal and a later run that loads its weights must fingerprint the model in the same state."""
    from mi_opt.arch import get_adapter
    from mi_opt.artifacts import model_fingerprint

    device = get_adapter(model).input_device()
    with torch.inference_mode():
        model(torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    return model_fingerprint(model)


def save_changed(model: nn.Module, names: list[str], path: Path, unhealed_fingerprint: str) -> Path:
    """The healed values of `names` (tied parameters once), as safetensors, written atomically.

    A quantized module's weight is stored as the float weight it computes with, and quantized
    again at load (idempotent: its values already lie on the quantization grid).
    unhealed_fingerprint: the compressed model's fingerprint before healing; loading checks it,
    because two plans can leave models of identical shapes (drop layer 1 or layer 2)."""
    from safetensors.torch import save_file

    from mi_opt.adapters import adapter_settings

    params = dict(model.named_parameters())
    tensors, requantized = {}, []
    for n in names:
        owner = model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else model
        if is_quantized(owner):
            from mi_opt.surgery.quantize import effective_weight

            tensors[n] = effective_weight(owner).cpu().contiguous()
            requantized.append(n)
        else:
            tensors[n] = params[n].detach().to("cpu").contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpfiles.remove_leftovers(path.parent, path.name)
    tmp = path.parent / f"{tmpfiles.prefix(path.name)}write"  # owned by this process: a kill leaves no orphan
    try:
        save_file(tensors, str(tmp), metadata={"unhealed_fingerprint": unhealed_fingerprint,
                                               "requantize": json.dumps(requantized),
                                               "adapters": json.dumps(adapter_settings(model))})
        os.chmod(tmp, tmpfiles.umask_mode(0o666))  # safetensors writes 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_changed_(model: nn.Module, path: Path) -> nn.Module:
    """Put healed values saved by `save_changed` back into the compressed model they were healed from."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise MiOptError(f"{path} is not a readable safetensors file ({err}); rerun the heal stage") from None
    if meta.get("unhealed_fingerprint") != settled_fingerprint(model):
        raise MiOptError(f"{path} holds weights healed from another compressed model (another plan or source); "
                         "rerun the heal stage")
    requantized = set(json.loads(meta.get("requantize", "[]")))
    adapters = json.loads(meta.get("adapters", "{}"))
    if adapters:  # healed with heal.adapters "keep": the adapters' values follow
        from mi_opt.adapters import inject_adapters_

        inject_adapters_(model, adapters)
    params = dict(model.named_parameters())
    unknown = [n for n in tensors if n not in params]
    wrong = [n for n, t in tensors.items() if n in params and n not in requantized and params[n].shape != t.shape]
    if unknown or wrong:
        raise MiOptError(f"{path} does not fit this model (unknown {unknown[:3]}, wrong shapes {wrong[:3]}): it "
                         "was healed from another plan; rerun the heal stage")
    with torch.no_grad():
        for n, t in tensors.items():
            if n in requantized:
                from mi_opt.surgery.quantize import requantize_

                dtype = get_adapter(model).embedding().weight.dtype
                requantize_(model, n.rsplit(".", 1)[0], t.to(params[n].device, dtype))
            else:
                params[n].copy_(t.to(params[n].device, params[n].dtype))
    return model
