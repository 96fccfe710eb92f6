"""What llama.cpp expects of each model family in a GGUF file: architecture name, metadata keys,
tensor layout, and what it cannot express. Only families listed in GGUF_FAMILIES are exported;
every other one is refused with its adapter's reason (ArchAdapter.gguf_refusal) before anything is written.

Llama, as llama.cpp's convert_hf_to_gguf.py writes it: tensor names from gguf-py's TensorNameMap,
q_proj and k_proj rows permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's
interleaved pairs (per head: rows [0, d/2) and [d/2, d) become pairs 2i, 2i+1), transformers
undoing it on load. A layer-dropped model is a shorter block list; uniformly pruned heads are a
smaller head_count with key_length/value_length keeping head_dim; uniformly pruned MLP neurons are a
smaller feed_forward_length (per-layer sizes are refused: see check_mlp_sizes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from torch import nn

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.plan import CompressionPlan


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> llama.cpp row order of a q/k weight [n_head * head_dim, ...] (convert_hf_to_gguf's permute);
    works on float rows and on packed quantized rows alike (it only reorders axis 0)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class GgufFamily:
    arch: str                                        # gguf MODEL_ARCH name, e.g. "LLAMA"
    check: Callable[[nn.Module], None]               # raises MiOptError for what the file cannot express
    metadata: Callable[[object, nn.Module], None]    # writes the architecture's keys to a GGUFWriter
    row_heads: Callable[[nn.Module, str], int | None]  # heads to permute a tensor's rows by, or None


def _uniform(values: list, what: str) -> int:
    if len(set(values)) != 1:
        raise MiOptError(f"GGUF export: {what} differ per layer ({values}); llama.cpp reads one value for every "
                         "layer here, so use a uniform plan (head_mode: uniform) or the safetensors export")
    return values[0]


def check_mlp_sizes(sizes: list[int]) -> None:
    """One MLP size for every layer, or the refusal. llama.cpp itself reads a per-layer
    feed_forward_length array for some architectures, but transformers' GGUF loader reads one
    value, so such a file could not be verified here, and mi-opt writes nothing it has not verified."""
    if len(set(sizes)) > 1:
        raise MiOptError(f"GGUF export: the MLP sizes differ per layer ({sizes}), and a per-layer "
                         "feed_forward_length could not be verified (transformers' GGUF loader reads one size for "
                         "every layer); prune neurons with neuron_mode 'uniform', or use the safetensors export")


def check_plan_mlp_sizes(model: nn.Module, plan: CompressionPlan) -> None:
    """check_mlp_sizes for the model `plan` would leave, asked of the unpruned model before any work."""
    adapter = get_adapter(model)
    dropped = set(plan.drop_layers)
    check_mlp_sizes([adapter.mlp_width(i) - len(set(plan.prune_neurons.get(i, ())))
                     for i in range(adapter.n_layers()) if i not in dropped])


def _llama_check(model: nn.Module) -> None:
    cfg = model.config
    adapter = get_adapter(model)
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise MiOptError("GGUF export: this Llama has attention or MLP biases, which transformers' GGUF loader "
                         "does not rebuild, so the export could not be verified; use the safetensors export")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise MiOptError(f"GGUF export: RoPE type {rope.get('rope_type')!r} is not written yet (only the default "
                         "RoPE); use the safetensors export")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise MiOptError(f"GGUF export: llama.cpp's llama uses SiLU, this model uses {cfg.hidden_act!r}")
    heads = [adapter.heads(i) for i in range(adapter.n_layers())]
    _uniform([(g.n_heads, g.n_kv_heads) for g in heads], "head counts")
    check_mlp_sizes([adapter.mlp_width(i) for i in range(adapter.n_layers())])
    if model.config.model_type != "llama":
        raise MiOptError(f"GGUF export: model_type {model.config.model_type!r} is not written yet; Llama only")


def _llama_metadata(writer, model: nn.Module) -> None:
    cfg = model.config
    adapter = get_adapter(model)
    geo = adapter.heads(0)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(adapter.n_layers())
    writer.add_feed_forward_length(adapter.mlp_width(0))  # after neuron pruning: the one size every layer has
    writer.add_head_count(geo.n_heads)
    writer.add_head_count_kv(geo.n_kv_heads)
    writer.add_key_length(geo.head_dim)       # hidden_size / head_count no longer gives it once heads are pruned
    writer.add_value_length(geo.head_dim)
    writer.add_rope_dimension_count(geo.head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)


def _llama_row_heads(model: nn.Module, name: str) -> int | None:
    geo = get_adapter(model).heads(0)
    if name.endswith("self_attn.q_proj.weight"):
        return geo.n_heads
    if name.endswith("self_attn.k_proj.weight"):
        return geo.n_kv_heads
    return None


GGUF_FAMILIES: dict[str, GgufFamily] = {
    "llama": GgufFamily("LLAMA", _llama_check, _llama_metadata, _llama_row_heads),
}

def gguf_family(model: nn.Module) -> GgufFamily:
    """The family table for this model, or one clear refusal."""
    adapter = get_adapter(model)
    family = adapter.family
    if family in GGUF_FAMILIES and adapter.gguf_refusal is None:
        return GGUF_FAMILIES[family]
    reason = adapter.gguf_refusal or "no GGUF layout is written for it"
    raise MiOptError(f"GGUF export of the {family} family is refused: {reason}. GGUF export supports "
                     f"{', '.join(GGUF_FAMILIES)}; use the safetensors export (the default format) instead")
