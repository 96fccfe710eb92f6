"""Where things live inside each supported model family.

Every other module asks an `ArchAdapter` for decoder layers, attention and MLP
sublayers, the head-output projection and the head geometry, and for everything that
differs between families: which modules are linears (GPT-2's Conv1D stores [in, out]),
the weight slices of one head, how head surgery reshapes a layer and what the config must
say afterwards. Supporting a new family means adding one adapter here and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mi_opt.errors import MiOptError


def _unit_rows(units, width: int, offset: int = 0) -> torch.Tensor:
    """Row indices of whole units (heads) of `width` rows each, starting at `offset`."""
    return torch.cat([torch.arange(offset + u * width, offset + (u + 1) * width) for u in units])


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous().clone(), requires_grad=old.requires_grad))


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes module (mi-opt's own 4-bit class subclasses bitsandbytes'), or a linear whose
    weight is a torchao tensor subclass (torchao quantizes in place and keeps the nn.Linear). Decided
    by the classes' modules, so that asking about an unquantized model never imports either library."""
    if any(c.__module__.startswith("bitsandbytes") for c in type(module).__mro__):
        return True
    weight = getattr(module, "weight", None) if isinstance(module, nn.Linear) else None
    return weight is not None and type(weight).__module__.startswith("torchao")


def _slice_linear(lin: nn.Module, out_rows: torch.Tensor | None = None, in_cols: torch.Tensor | None = None,
                  what: str = "heads") -> None:
    if not isinstance(lin, nn.Linear) or is_quantized(lin):
        raise MiOptError(f"cannot prune {what} of a {type(lin).__name__}: prune {what} before quantizing")
    w = lin.weight.data
    if out_rows is not None:
        w = w[out_rows.to(w.device)]
        if lin.bias is not None:
            _set_param(lin, "bias", lin.bias.data[out_rows.to(w.device)])
        lin.out_features = w.shape[0]
    if in_cols is not None:
        w = w[:, in_cols.to(w.device)]
        lin.in_features = w.shape[1]
    _set_param(lin, "weight", w)


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of `weight` ([out, in]) and `bias`, in the weight's dtype."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


@dataclass(frozen=True)
class HeadGeometry:
    """Head counts of one attention sublayer. Query head h reads KV head h // group_size."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class HeadLayout:
    """What one attention layer keeps, in the numbering of the layer before pruning."""

    keep_heads: tuple[int, ...]   # query heads kept, in order
    kv_sources: tuple[int, ...]   # for each new KV head, the old KV head whose rows it copies
    head_dim: int

    @property
    def n_heads(self) -> int:
        return len(self.keep_heads)

    @property
    def n_kv_heads(self) -> int:
        return len(self.kv_sources)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


class ArchAdapter:
    """Base adapter for decoder-only models laid out like Llama (`model.model.layers`)."""

    family: str = "llama"
    model_types: tuple[str, ...] = ("llama", "mistral", "mixtral")

    # Why a GGUF file for llama.cpp is not written for this family (None: it is, mi_opt.formats).
    gguf_refusal: str | None = None

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

    def input_device(self) -> torch.device:
        """Where token ids go: the embedding's execution device under accelerate dispatch
        (its weights may sit on "meta" while offloaded), else the embedding weight's device."""
        embedding = self.embedding()
        device = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        return embedding.weight.device

    def is_tied(self) -> bool:
        """True when lm_head *is* the embedding matrix (as in SmolLM2)."""
        head_w = getattr(self.lm_head(), "weight", None)
        return head_w is not None and head_w is self.embedding().weight

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

    # --- linears ---------------------------------------------------------------
    def linear_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        """The projections of one layer (quantized ones included), by name relative to the layer."""
        return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}

    def is_full_precision_linear(self, module: nn.Module) -> bool:
        """A linear that can still be quantized (bitsandbytes modules subclass nn.Linear, torchao keeps
        nn.Linear with a quantized weight: not those)."""
        return type(module) is nn.Linear and not is_quantized(module)

    def full_precision_linears(self, root: nn.Module) -> dict[str, nn.Module]:
        """Every full-precision linear under `root`, by name relative to it."""
        return {name: m for name, m in root.named_modules() if self.is_full_precision_linear(m)}

    def as_linear(self, module: nn.Module) -> nn.Linear:
        """A full-precision linear as an nn.Linear (weight [out, in]); the module itself when it is one."""
        return module

    def linear_shape(self, module: nn.Module) -> tuple[int, int, bool]:
        """(out, in, has_bias) of a full-precision linear."""
        return module.out_features, module.in_features, module.bias is not None

    # Whether a checkpoint of this family's quantized decoder linears is a layout plain
    # transformers reloads (its BitsAndBytesConfig path), not only mi-opt's loader.
    transformers_reloads_quantized: bool = True
    projection_module: str = "nn.Linear"  # the class of this family's decoder projections, for messages

    # --- heads -------------------------------------------------------------------
    def head_projections(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(query weights, head-output projection weights) of one layer, both [out, in]."""
        layer = self.layers()[layer_index]
        return self.attention(layer).q_proj.weight, self.head_output_proj(layer).weight

    def kv_projections(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key weights, value weights) of one layer, [out, in]."""
        attn = self.attention(self.layers()[layer_index])
        return attn.k_proj.weight, attn.v_proj.weight

    def head_params(self, layer_index: int) -> tuple[int, int]:
        """Parameters of one query head (q rows + bias, o columns) and of one KV head (k, v rows + bias)."""
        attn = self.attention(self.layers()[layer_index])
        hd = self.heads(layer_index).head_dim
        q, k, o = attn.q_proj, attn.k_proj, attn.o_proj
        return (hd * q.in_features + (hd if q.bias is not None else 0) + hd * o.out_features,
                2 * (hd * k.in_features + (hd if k.bias is not None else 0)))

    def reshape_heads_(self, layer_index: int, layout: HeadLayout) -> None:
        """Slice one layer's attention projections to `layout` and fix its head bookkeeping."""
        attn = self.attention(self.layers()[layer_index])
        hd = layout.head_dim
        q_rows = _unit_rows(layout.keep_heads, hd)
        kv_rows = _unit_rows(layout.kv_sources, hd)
        _slice_linear(attn.q_proj, out_rows=q_rows)
        _slice_linear(attn.k_proj, out_rows=kv_rows)
        _slice_linear(attn.v_proj, out_rows=kv_rows)
        _slice_linear(attn.o_proj, in_cols=q_rows)
        # Eager and sdpa attention read num_key_value_groups for repeat_kv / GQA; older or other
        # attention classes keep num_heads / num_key_value_heads: update whichever exist.
        attn.num_key_value_groups = layout.group_size
        for name, value in (("num_heads", layout.n_heads), ("num_key_value_heads", layout.n_kv_heads),
                            ("num_attention_heads", layout.n_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)

    def placeholder_layout(self, n_heads: int, n_kv_heads: int, head_dim: int) -> HeadLayout:
        """A layout of the given shape (weights to be overwritten by a loader)."""
        return HeadLayout(keep_heads=tuple(range(n_heads)), kv_sources=(0,) * n_kv_heads, head_dim=head_dim)

    def record_head_shapes_(self, head_dim: int, shapes: set[tuple[int, int]]) -> None:
        """After head surgery: make the config say what it can. `shapes` = (heads, kv heads) per layer."""
        cfg = self.config.get_text_config()
        # hidden_size / num_heads no longer gives head_dim, so keep it explicit in the config.
        cfg.head_dim = head_dim
        if len(shapes) == 1:
            # Every layer has the same shape (always so in uniform mode): the config's single head
            # count can say it, so plain transformers can load the result.
            cfg.num_attention_heads, cfg.num_key_value_heads = next(iter(shapes))

    def head_shapes_unloadable(self, heads: list[tuple[int, int]]) -> str | None:
        """Why plain transformers cannot rebuild these (heads, kv heads) per layer, or None if it can."""
        cfg = self.config.get_text_config()
        if any((h, kv) != (cfg.num_attention_heads, cfg.num_key_value_heads) for h, kv in heads):
            return "different head counts per layer"
        return None


    # --- MLP neurons -------------------------------------------------------------
    # A gated MLP computes down(act(gate(x)) * up(x)): neuron j is row j of gate and up and
    # column j of down, and the input of down holds every neuron's activation.
    def mlp_input_projections(self, layer: nn.Module) -> list[nn.Module]:
        """The projections whose output rows are the MLP's intermediate neurons."""
        mlp = self.mlp(layer)
        return [mlp.gate_proj, mlp.up_proj]

    def mlp_output_projection(self, layer: nn.Module) -> nn.Module:
        """The projection whose input columns are the neurons' activations (hook its input to see them)."""
        return self.mlp(layer).down_proj

    def mlp_width(self, layer_index: int) -> int:
        """Intermediate neurons of one layer's MLP, read from the live modules (pruning changes it)."""
        return self.linear_shape(self.mlp_output_projection(self.layers()[layer_index]))[1]

    def neuron_params(self, layer_index: int) -> int:
        """Parameters of one intermediate neuron: its input rows (+ biases) and its output column."""
        layer = self.layers()[layer_index]
        total = 0
        for proj in self.mlp_input_projections(layer):
            _, n_in, bias = self.linear_shape(proj)
            total += n_in + int(bias)
        return total + self.linear_shape(self.mlp_output_projection(layer))[0]

    def slice_mlp_(self, layer_index: int, keep: torch.Tensor) -> None:
        """Keep only neurons `keep` (sorted indices) of one layer's MLP: rows of the input
        projections, columns of the output projection."""
        layer = self.layers()[layer_index]
        for proj in self.mlp_input_projections(layer):
            _slice_linear(proj, out_rows=keep, what="MLP neurons")
        _slice_linear(self.mlp_output_projection(layer), in_cols=keep, what="MLP neurons")

    def record_mlp_sizes_(self, sizes: set[int]) -> None:
        """After neuron surgery: when every layer has one MLP size, the config says it, so plain
        transformers builds the model (per-layer sizes are the sidecar's to say)."""
        if len(sizes) == 1:
            self.config.get_text_config().intermediate_size = next(iter(sizes))

    def mlp_sizes_unloadable(self, sizes: list[int]) -> str | None:
        """Why plain transformers cannot rebuild these MLP sizes per layer, or None if it can."""
        if any(n != self.config.get_text_config().intermediate_size for n in sizes):
            return "different MLP sizes per layer"
        return None

class Qwen2Adapter(ArchAdapter):
    family = "qwen2"
    model_types = ("qwen2", "qwen3")
    gguf_refusal = "Qwen's GGUF layout (QKV biases, Qwen3 q/k norms) is not written yet"


class GemmaAdapter(ArchAdapter):
    family = "gemma"
    model_types = ("gemma", "gemma2", "gemma3_text")

    @property
    def gguf_refusal(self) -> str:
        if str(self.config.model_type).startswith("gemma3"):
            return ("llama.cpp derives Gemma 3's sliding-window pattern from the layer index (every 6th layer "
                    "global), so a layer-dropped Gemma 3 would silently attend with the wrong windows; not written "
                    "until verified")
        return "Gemma's GGUF layout (scaled embeddings, norm offsets) is not written yet"


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
    gguf_refusal = "GPT-2's GGUF layout (fused QKV, learned positions) is not written yet"

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

    # --- linears: Conv1D stores its weight [in, out] ----------------------------
    def linear_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        from transformers.pytorch_utils import Conv1D

        return {name: m for name, m in layer.named_modules() if isinstance(m, (nn.Linear, Conv1D))}

    def is_full_precision_linear(self, module: nn.Module) -> bool:
        from transformers.pytorch_utils import Conv1D

        return (type(module) is nn.Linear and not is_quantized(module)) or isinstance(module, Conv1D)

    def as_linear(self, module: nn.Module) -> nn.Linear:
        if type(module) is nn.Linear:
            return module
        return linear_from(module.weight.T, module.bias)

    def linear_shape(self, module: nn.Module) -> tuple[int, int, bool]:
        if isinstance(module, nn.Linear):
            return super().linear_shape(module)
        i, o = module.weight.shape
        return o, i, module.bias is not None

    # Converted Conv1D modules are not a layout transformers promises to reload.
    transformers_reloads_quantized = False
    projection_module = "Conv1D"

    # --- heads: c_attn's columns are [q | k | v], each head-major ---------------
    def head_projections(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.attention(self.layers()[layer_index])
        o = attn.c_proj.weight
        return attn.c_attn.weight[:, :o.shape[1]].T, o.T

    def kv_projections(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.attention(self.layers()[layer_index])
        width = attn.split_size
        return attn.c_attn.weight[:, width:2 * width].T, attn.c_attn.weight[:, 2 * width:].T

    def head_params(self, layer_index: int) -> tuple[int, int]:
        attn = self.attention(self.layers()[layer_index])
        hd, hidden = self.heads(layer_index).head_dim, attn.c_attn.weight.shape[0]
        return hd * hidden + hd + hd * attn.c_proj.weight.shape[1], 2 * (hd * hidden + hd)

    def reshape_heads_(self, layer_index: int, layout: HeadLayout) -> None:
        if layout.kv_sources != layout.keep_heads:
            raise MiOptError("GPT-2 has one KV head per query head; its layout cannot regroup heads")
        attn = self.attention(self.layers()[layer_index])
        hd, width = layout.head_dim, attn.split_size
        keep = layout.keep_heads
        cols = torch.cat([_unit_rows(keep, hd, offset) for offset in (0, width, 2 * width)])
        c_attn, c_proj = attn.c_attn, attn.c_proj
        _set_param(c_attn, "weight", c_attn.weight.data[:, cols.to(c_attn.weight.device)])
        _set_param(c_attn, "bias", c_attn.bias.data[cols.to(c_attn.bias.device)])
        c_attn.nf = len(cols)
        _set_param(c_proj, "weight", c_proj.weight.data[_unit_rows(keep, hd).to(c_proj.weight.device)])
        c_proj.nx = c_proj.weight.shape[0]
        attn.split_size = len(keep) * hd
        attn.num_heads = len(keep)

    def placeholder_layout(self, n_heads: int, n_kv_heads: int, head_dim: int) -> HeadLayout:
        keep = tuple(range(n_heads))
        return HeadLayout(keep_heads=keep, kv_sources=keep, head_dim=head_dim)

    def record_head_shapes_(self, head_dim: int, shapes: set[tuple[int, int]]) -> None:
        """GPT-2 configs derive head_dim from n_head: nothing they can say about pruned heads."""

    def head_shapes_unloadable(self, heads: list[tuple[int, int]]) -> str | None:
        n_head = self.config.get_text_config().n_head
        return None if all(h == n_head for h, _ in heads) else "GPT-2 configs derive head_dim from n_head"


    # --- MLP neurons: c_fc's output columns, c_proj's input rows (Conv1D is [in, out]) ---
    def mlp_input_projections(self, layer: nn.Module) -> list[nn.Module]:
        return [self.mlp(layer).c_fc]

    def mlp_output_projection(self, layer: nn.Module) -> nn.Module:
        return self.mlp(layer).c_proj

    def slice_mlp_(self, layer_index: int, keep: torch.Tensor) -> None:
        mlp = self.mlp(self.layers()[layer_index])
        if not all(self.is_full_precision_linear(m) for m in (mlp.c_fc, mlp.c_proj)):
            raise MiOptError("cannot prune MLP neurons of a quantized layer: prune neurons before quantizing")
        c_fc, c_proj = mlp.c_fc, mlp.c_proj
        _set_param(c_fc, "weight", c_fc.weight.data[:, keep.to(c_fc.weight.device)])
        _set_param(c_fc, "bias", c_fc.bias.data[keep.to(c_fc.bias.device)])
        c_fc.nf = len(keep)
        _set_param(c_proj, "weight", c_proj.weight.data[keep.to(c_proj.weight.device)])
        c_proj.nx = len(keep)

    def record_mlp_sizes_(self, sizes: set[int]) -> None:
        if len(sizes) == 1:
            self.config.get_text_config().n_inner = next(iter(sizes))

    def mlp_sizes_unloadable(self, sizes: list[int]) -> str | None:
        cfg = self.config.get_text_config()
        configured = cfg.n_inner if cfg.n_inner is not None else 4 * cfg.n_embd
        return None if all(n == configured for n in sizes) else "different MLP sizes per layer"

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
