"""The torchao backend: int8 weight-only (`Int8WeightOnlyConfig`: symmetric int8 weights with one
fp32 scale per GROUP = 64 inputs of a row, activations left in the model's dtype), applied per
module through torchao's `FqnToConfig`.

Why it exists: on SmolLM2 LLM.int8 (bitsandbytes) costs +0.41 perplexity (handbook+kjv) with every
decoder linear in int8, mostly from rounding *activations*. Rounding only the weights costs +0.16
with one scale per row (torchao's default) and nothing measurable (-0.01) with one scale per 64
inputs, which costs half a bit per weight more (8.5 bits, GGUF Q8_0's size; reports/torchao_int8.md).
A linear whose input size 64 does not divide (or is not above) falls back to one scale per row. The quantized module stays an `nn.Linear` whose weight is a torchao
`Int8Tensor`; the export is what transformers' own torchao integration writes and reads:
safetensors of the flattened tensor subclasses (`qdata`, `scale`) with their description in the
file's metadata, and a `TorchAoConfig` naming every quantized module in config.json, so plain
`AutoModelForCausalLM.from_pretrained` rebuilds exactly the same modules.

int4 is refused: torchao 0.18's int4 weight-only layouts have no CPU kernel in this wheel (checked:
`plain` needs the mslk package, `plain_int32` says it does not support cpu, `tile_packed_to_4d` asks
for CUDA), and an int4 that only dequantizes (`IntxWeightOnlyConfig`) stores one int8 per weight, so
it would save no bytes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mi_opt.errors import MiOptError
from mi_opt.quant.base import QuantBackend, QuantOptions, load_remaining_

WEIGHTS_FILE = "model.safetensors"


def _torchao():
    import logging

    # On a CPU-only machine torchao's import tries each bundled CUDA kernel library and logs one
    # warning per file; int8 weight-only on CPU needs none of them, so they are not shown.
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torchao
        from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise MiOptError("the torchao backend needs torchao: pip install 'torchao==0.18.0'") from err
    finally:
        log.setLevel(level)
    return torchao, FqnToConfig, Int8WeightOnlyConfig, quantize_


# One int8 scale per GROUP consecutive input weights of a row, or None for one scale per row
# (benchmarks/torchao_int8.py measures both).
GROUP: int | None = 64


def group_of(in_features: int) -> int | None:
    """The scale group a linear with `in_features` inputs gets (per row when GROUP does not divide it)."""
    return GROUP if GROUP is not None and in_features % GROUP == 0 and in_features > GROUP else None


def _int8_config(in_features: int):
    from torchao.quantization.granularity import PerGroup, PerRow

    group = group_of(in_features)
    # set_inductor_config=False: torchao would otherwise change torch._inductor's global settings
    # as a side effect of quantizing, which nothing here compiles with.
    return _torchao()[2](granularity=PerGroup(group) if group else PerRow(), set_inductor_config=False)


def _in_features(module: nn.Module) -> int:
    weight = module.weight
    return weight.shape[-1]


class TorchAoBackend(QuantBackend):
    name = "torchao"
    formats = {8: ("int8-weight-only",)}  # scales per GROUP inputs (see above)
    refused = {4: "torchao 0.18's int4 weight-only layouts have no CPU kernel in this wheel (plain needs mslk, "
                  "plain_int32 does not support cpu, tile_packed_to_4d needs CUDA), so mi-opt offers torchao int8 only"}
    devices = ("cpu", "cuda")
    serialization = ("safetensors of torchao's flattened tensor subclasses (int8 qdata + scales, described "
                     "in the file's metadata), TorchAoConfig(FqnToConfig) naming every module in config.json")
    transformers_reloads = "yes (transformers' torchao integration), for families whose linears are nn.Linear"
    embed_refusal = ("mi-opt quantizes only linear weights with torchao (Int8WeightOnlyConfig targets nn.Linear; "
                     "an int8 embedding lookup is not part of this backend)")

    def version(self) -> str:
        return _torchao()[0].__version__

    def quantized_linear(self, linear: nn.Linear, width: int, options: QuantOptions) -> nn.Module:
        from mi_opt.arch import linear_from

        self.check_widths([width], "quantized_linear")
        q = linear_from(linear.weight.detach(), linear.bias.detach() if linear.bias is not None else None)
        _torchao()[3](q, _int8_config(q.in_features))  # the root module itself matches torchao's linear filter
        return q.eval()

    def quantize_(self, model: nn.Module, bits: dict[str, int], options: QuantOptions) -> dict[str, int]:
        from mi_opt.arch import get_adapter
        from mi_opt.surgery.quantize import resolve_targets

        self.check_bits(bits, options.quant_type)
        targets = {n: w for n, w in resolve_targets(model, bits).items() if w < 16}
        self.check_devices(model, targets)
        adapter = get_adapter(model)
        for name in targets:  # torchao quantizes nn.Linear: a family's other projection modules convert first
            original = model.get_submodule(name)
            if type(original) is not nn.Linear:
                model.set_submodule(name, adapter.as_linear(original))
        _, FqnToConfig, _, quantize_ = _torchao()
        if targets:
            quantize_(model, FqnToConfig({n: _int8_config(model.get_submodule(n).in_features) for n in targets}),
                      filter_fn=None)
        missed = [n for n in targets if not self.is_quantized(model.get_submodule(n))]
        if missed:
            raise MiOptError(f"internal: torchao left {missed[:3]} unquantized")
        return targets

    def quantized_bytes(self, numel: int, out_features: int, bits: int, has_bias: bool = False) -> int:
        if bits != 8:
            return super().quantized_bytes(numel, out_features, bits, has_bias)
        in_features = numel // out_features
        group = group_of(in_features)
        scales = out_features * (in_features // group if group else 1)  # one fp32 scale per group (or row)
        return numel + 4 * scales + (2 * out_features if has_bias else 0)

    def is_quantized(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None) if isinstance(module, nn.Linear) else None
        return weight is not None and type(weight).__module__.startswith("torchao")

    # --- storing ------------------------------------------------------------------------
    def modules(self, model: nn.Module) -> dict[str, int]:
        return {n: 8 for n, m in model.named_modules() if self.is_quantized(m)}

    def hf_config(self, model: nn.Module, modules: dict[str, int]) -> dict | None:
        """The TorchAoConfig dict plain transformers reloads this model with, or None if it cannot."""
        from transformers import TorchAoConfig

        from mi_opt.arch import get_adapter

        adapter = get_adapter(model)
        if not modules or not adapter.transformers_reloads_quantized:
            return None  # converted projections: transformers would rebuild the family's own modules there
        names = {id(m): n for n, m in model.named_modules()}
        head = names.get(id(adapter.lm_head())) in modules  # transformers skips lm_head unless told
        FqnToConfig = _torchao()[1]
        cfg = TorchAoConfig(quant_type=FqnToConfig({n: _int8_config(_in_features(model.get_submodule(n)))
                                                    for n in sorted(modules)}),
                            include_input_output_embeddings=head)
        return cfg.to_dict()

    def save(self, model: nn.Module, out_dir, replace: dict[str, torch.Tensor] | None = None) -> dict:
        from safetensors.torch import save
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        from mi_opt.arch import get_adapter
        from mi_opt.artifacts import atomic_write_bytes

        modules = self.modules(model)
        state, tied = {}, []
        seen: dict[tuple, str] = {}
        for key, t in model.state_dict().items():
            if type(t) is torch.Tensor and t.numel():  # tied duplicates once (safetensors refuses shared tensors)
                ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
                if ident in seen:
                    tied.append(key)
                    continue
                seen[ident] = key
                t = (replace or {}).get(key, t).detach().to("cpu").contiguous()
            state[key] = t
        tensors, metadata = flatten_tensor_state_dict(state)
        atomic_write_bytes(Path(out_dir) / WEIGHTS_FILE, save(tensors, metadata={"format": "pt", **metadata}))
        hf_config = self.hf_config(model, modules)
        return {"backend": self.name, "backend_version": self.version(), "weights": WEIGHTS_FILE,
                "modules": modules, "format": self.formats[8][0], "tied_not_saved": tied,
                "scale_groups": {n: group_of(_in_features(model.get_submodule(n))) for n in modules},
                "loader": "transformers" if hf_config is not None else "mi_opt", "quantization_config": hf_config,
                "loader_reason": None if hf_config is not None or not modules else
                (f"transformers would rebuild this family's projections as {get_adapter(model).projection_module}, "
                 "not the nn.Linear torchao quantized")}

    def load_(self, model: nn.Module, folder, metadata: dict) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        from mi_opt.arch import get_adapter

        _torchao()
        path = Path(folder) / metadata.get("weights", WEIGHTS_FILE)
        if not path.is_file():
            raise MiOptError(f"{path} does not exist; point at a folder written by the torchao backend")
        with safe_open(str(path), framework="pt") as f:
            file_meta = f.metadata() or {}
        state, leftover = unflatten_tensor_state_dict(load_file(str(path)), file_meta)
        if leftover:
            raise MiOptError(f"{path}: tensors {sorted(leftover)[:5]} are not described by its torchao metadata")
        adapter = get_adapter(model)
        for name in metadata["modules"]:
            try:
                current = model.get_submodule(name)
            except AttributeError:
                raise MiOptError(f"quantized module {name} does not exist in the given model: rebuild it at the "
                                 "post-surgery shapes before loading") from None
            if not adapter.is_full_precision_linear(current):
                raise MiOptError(f"{name} is a {type(current).__name__}, expected a full-precision linear to replace")
            if f"{name}.weight" not in state:
                raise MiOptError(f"the saved weights have no entry for quantized module {name}")
            shell = adapter.as_linear(current) if type(current) is not nn.Linear else current
            device = current.weight.device
            shell.weight = nn.Parameter(state.pop(f"{name}.weight").to(device), requires_grad=False)
            if f"{name}.bias" in state:
                shell.bias = nn.Parameter(state.pop(f"{name}.bias").to(device), requires_grad=False)
            model.set_submodule(name, shell)
        load_remaining_(model, state, metadata, path)
