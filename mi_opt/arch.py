"""Where things live inside each supported model family.

Every other module asks an `ArchAdapter` for decoder layers, attention and MLP
sublayers, the head-output projection and the head geometry, so that supporting a new
family means adding one adapter here and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mi_opt.errors import MiOptError


@dataclass(frozen=True)
class HeadGeometry:
    """Head counts of one attention sublayer. Query head h reads KV head h // group_size."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


class ArchAdapter:
    """Base adapter for decoder-only models laid out like Llama (`model.model.layers`)."""

    family: str = "llama"
    model_types: tuple[str, ...] = ("llama", "mistral", "mixtral")

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- structure -------------------------------------------------------------
    def decoder(self) -> nn.Module:
        """The module that owns the layer list and the final norm."""
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def set_layers(self, layers: nn.ModuleList) -> None:
        self.decoder().layers = layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def head_output_proj(self, layer: nn.Module) -> nn.Module:
        """The projection whose input is the concatenation of per-head outputs."""
        return layer.self_attn.o_proj

    def final_norm(self) -> nn.Module:
        return self.decoder().norm

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def embedding(self) -> nn.Module:
        return self.decoder().embed_tokens

    # --- geometry --------------------------------------------------------------
    def n_layers(self) -> int:
        return len(self.layers())

    def heads(self, layer_index: int) -> HeadGeometry:
        """Head geometry of one layer, read from the live modules (pruning changes it)."""
        attn = self.attention(self.layers()[layer_index])
        n_heads = self.head_output_proj(self.layers()[layer_index]).in_features // attn.head_dim
        n_kv = attn.k_proj.out_features // attn.head_dim
        return HeadGeometry(n_heads=n_heads, n_kv_heads=n_kv, head_dim=attn.head_dim)

    def heads_per_layer(self) -> list[int]:
        """Query heads of every layer; 0 where the attention block itself was removed."""
        counts = []
        for i in range(self.n_layers()):
            try:
                counts.append(self.heads(i).n_heads)
            except AttributeError:  # a stand-in without projections: no heads
                counts.append(0)
        return counts

    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 0)

    # --- computation -----------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last layer's output, exactly as the model's own forward does."""
        logits = self.lm_head()(self.final_norm()(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def linear_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        """The quantizable projections of one layer, by name relative to the layer."""
        return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


class Qwen2Adapter(ArchAdapter):
    family = "qwen2"
    model_types = ("qwen2", "qwen3")


class GemmaAdapter(ArchAdapter):
    family = "gemma"
    model_types = ("gemma", "gemma2", "gemma3_text")


class Gemma3Adapter(GemmaAdapter):
    """Gemma 3 multimodal wrappers keep the text decoder under model.language_model."""

    family = "gemma3"
    model_types = ("gemma3",)

    def decoder(self) -> nn.Module:
        inner = self.model.model
        return getattr(inner, "language_model", inner)


class GPT2Adapter(ArchAdapter):
    """GPT-2: fused c_attn (q, k and v in one Conv1D), c_proj as the head-output projection."""

    family = "gpt2"
    model_types = ("gpt2",)

    def decoder(self) -> nn.Module:
        return self.model.transformer

    def layers(self) -> nn.ModuleList:
        return self.decoder().h

    def set_layers(self, layers: nn.ModuleList) -> None:
        self.decoder().h = layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def head_output_proj(self, layer: nn.Module) -> nn.Module:
        return layer.attn.c_proj

    def final_norm(self) -> nn.Module:
        return self.decoder().ln_f

    def embedding(self) -> nn.Module:
        return self.decoder().wte

    def heads(self, layer_index: int) -> HeadGeometry:
        attn = self.attention(self.layers()[layer_index])
        n_heads = attn.c_proj.weight.shape[0] // attn.head_dim  # Conv1D weight is (in, out)
        return HeadGeometry(n_heads=n_heads, n_kv_heads=n_heads, head_dim=attn.head_dim)

    def max_positions(self) -> int:
        return int(self.config.n_positions)

    def linear_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        from transformers.pytorch_utils import Conv1D

        return {name: m for name, m in layer.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


ADAPTERS: tuple[type[ArchAdapter], ...] = (ArchAdapter, Qwen2Adapter, GemmaAdapter, Gemma3Adapter, GPT2Adapter)


def supported_model_types() -> list[str]:
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for this model's family, or one clear error listing what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise MiOptError(
        f"unsupported architecture {model_type!r}; mi-opt supports model_type in "
        f"{', '.join(supported_model_types())}. Add an ArchAdapter in mi_opt/arch.py for others."
    )
