"""LoRA adapters for healing (through peft), folded back into the weights or kept beside them.

By default (heal.adapters "merge") a healed checkpoint carries no adapters: the exported model
is the same kind of checkpoint as before healing and loads where it loaded. Plain linears merge
exactly. Quantized (bitsandbytes)
modules stay frozen while their adapters train, as in QLoRA: each computes with its dequantized
weight, held by a frozen float stand-in during training, because bitsandbytes' CPU 4-bit kernel
has no backward (gradients would silently stop at it). At the end the stand-in's weight plus
the adapter's update is quantized again at the module's own width and format: rounding to
nearest can swallow an update smaller than half a quantization step, which heal.json's KL after
healing measures. heal.adapters "keep" avoids that: the quantized modules come back unchanged
under their adapters, which the checkpoint ships in PEFT's format (mi_opt.adapters).
"""
from __future__ import annotations

from torch import nn

from mi_opt.adapters import PEFT_PREFIX
from mi_opt.arch import get_adapter, is_quantized
from mi_opt.heal.config import HealConfig


def quantized_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_quantized(m)]


def wrap_lora(student: nn.Module, modules: list[str], config: HealConfig) -> nn.Module:
    """The student with LoRA adapters on `modules` (full names); only the adapters train.
    peft picks the weight layout per module (GPT-2 stores [in, out])."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=modules, lora_dropout=0.0,
                      bias="none")
    return get_peft_model(student, lora)


def dequantized_stand_ins_(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Replace each quantized module in `names` by a frozen nn.Linear with the weight it computes
    with; returns the replaced modules by name (merge_lora_ or put_back_ restores them). Every
    quantized module on the gradient's path needs one, not only those with adapters."""
    from mi_opt.surgery.quantize import effective_weight, linear_from

    dtype = get_adapter(model).embedding().weight.dtype  # what the rest of the model computes in
    originals = {}
    for name in names:
        module = model.get_submodule(name)
        if is_quantized(module):
            model.set_submodule(name, linear_from(effective_weight(module).to(dtype), module.bias).requires_grad_(False))
            originals[name] = module
    return originals


def put_back_(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Undo dequantized_stand_ins_ for these modules: the quantized modules, as they were."""
    for name, module in originals.items():
        model.set_submodule(name, module)


def merge_lora_(wrapped: nn.Module, student: nn.Module, originals: dict[str, nn.Module] | None = None) -> list[str]:
    """Fold every adapter into its module's weights and remove the adapters, in place. Stand-ins
    (`originals`) with an adapter become quantized modules holding the update; the others get
    their quantized module back unchanged. Returns the names quantized again."""
    from peft.tuners.lora import LoraLayer

    originals = originals or {}
    requantize = {}
    for name, module in wrapped.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = name.removeprefix(PEFT_PREFIX)
        if name in originals:
            delta = module.get_delta_weight(module.active_adapters[0]).float()
            base = module.get_base_layer().weight
            requantize[name] = (base.float() + delta).to(base.dtype)
        else:
            module.merge()
    wrapped.unload()  # strips the wrappers; merged plain modules keep their merged weights
    put_back_(student, {n: m for n, m in originals.items() if n not in requantize})
    if requantize:
        from mi_opt.surgery.quantize import requantize_

        for name, weight in requantize.items():
            requantize_(student, name, weight, like=originals[name])
    return sorted(requantize)


def keep_lora_(wrapped: nn.Module, student: nn.Module, originals: dict[str, nn.Module] | None = None) -> list[str]:
    """Leave the adapters in `student` unmerged, each on its module as it was before training
    (a quantized module instead of its float stand-in); drop the PeftModel wrapper. Returns the
    names of the modules that keep adapters."""
    from peft.tuners.lora import LoraLayer

    originals = dict(originals or {})
    kept = []
    for name, module in wrapped.named_modules():
        if isinstance(module, LoraLayer):
            name = name.removeprefix(PEFT_PREFIX)
            if name in originals:
                module.base_layer = originals.pop(name)
            kept.append(name)
    put_back_(student, originals)  # quantized modules without adapters
    return sorted(kept)
