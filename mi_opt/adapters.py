"""LoRA adapters kept unmerged in a model: find them, set them aside, save and load them in PEFT's
own format.

A healed quantized model may keep its adapters next to the quantized weights instead of folding
them in (merging and quantizing again rounds away updates smaller than half a quantization
step). The checkpoint then holds the quantized model as before, loadable where it loaded, plus
an `adapter/` folder that `peft.PeftModel.from_pretrained(model, folder / "adapter")` or
transformers' `model.load_adapter(...)` puts on top. In memory the adapters are peft's LoRA
layers injected into the model itself (no PeftModel wrapper), so every mi-opt stage sees the
same model class and keys.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from torch import nn

from mi_opt.errors import MiOptError

ADAPTER_DIR = "adapter"          # inside a checkpoint
PEFT_PREFIX = "base_model.model."  # peft's key prefix in saved adapters and PeftModel module names
ADAPTER_NAME = "default"


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers in `model` by module name; empty without peft or adapters."""
    if not any("lora_" in n for n, _ in model.named_parameters()):
        return {}  # the cheap test first: peft is not imported for models that never had adapters
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix(PEFT_PREFIX): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_settings(model: nn.Module) -> dict:
    """What rebuilds the adapters: target modules, rank and alpha (one setting for all, as trained)."""
    layers = lora_layers(model)
    if not layers:
        return {}
    first = next(iter(layers.values()))
    return {"modules": sorted(layers), "rank": first.r[ADAPTER_NAME], "alpha": first.lora_alpha[ADAPTER_NAME]}


def _lora_config(settings: dict):
    from peft import LoraConfig

    return LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], target_modules=settings["modules"],
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", inference_mode=True)


def inject_adapters_(model: nn.Module, settings: dict) -> nn.Module:
    """Empty adapters (B = 0, so the model computes as before) on the modules `settings` names."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(_lora_config(settings), model, adapter_name=ADAPTER_NAME)
    return model


@contextlib.contextmanager
def set_aside(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """Inside the block the model holds its base modules only (as if it had no adapters); the
    adapters come back on exit, whatever happens inside."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        model.set_submodule(name, layer.get_base_layer())
    try:
        yield layers
    finally:
        for name, layer in layers.items():
            model.set_submodule(name, layer)


def save_adapters(model: nn.Module, folder: Path) -> dict:
    """The model's adapters as a PEFT adapter folder (adapter_config.json, adapter_model.safetensors);
    returns the settings written."""
    from safetensors.torch import save_file

    settings = adapter_settings(model)
    if not settings:
        raise MiOptError("the model has no LoRA adapters to save")
    tensors = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part)[ADAPTER_NAME].weight
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = weight.detach().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    _lora_config(settings).save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return settings


def load_adapters_(model: nn.Module, folder: Path) -> nn.Module:
    """Put the adapters saved in `folder` on `model`, in place (through peft's own loader)."""
    from peft import PeftModel

    if not (folder / "adapter_config.json").is_file():
        raise MiOptError(f"{folder} holds no adapter_config.json: the checkpoint's adapters are missing; "
                         "export it again")
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise MiOptError(f"{folder} holds {config.get('peft_type')!r} adapters; mi-opt writes and reads LoRA only")
    PeftModel.from_pretrained(model, str(folder), is_trainable=False)  # injects into `model` itself
    dtype = model.get_input_embeddings().weight.dtype  # what the model computes in (bf16 loads included)
    for layer in lora_layers(model).values():
        layer.lora_A.to(dtype)
        layer.lora_B.to(dtype)
    return model
