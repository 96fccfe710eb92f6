"""Delete decoder layers for real, keeping the KV cache and a saved config consistent.

Attention modules carry their own `layer_idx` (the KV cache slot they write), and configs
carry `num_hidden_layers` (and, for Gemma 3 / Qwen 2-3, per-layer `layer_types`). Forgetting
the first breaks `generate()`; forgetting the second makes a reload silently re-add freshly
initialized layers or pick the wrong attention mask per layer.
"""
from __future__ import annotations

from torch import nn

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError


def check_drop(model: nn.Module, drop: list[int]) -> None:
    """Raise before anything is touched when `drop` (current numbering) cannot be applied."""
    n = get_adapter(model).n_layers()
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise MiOptError(f"cannot drop layer(s) {bad}: the model has layers 0..{n - 1}")
    if len(set(drop)) >= n:
        raise MiOptError(f"the plan drops all {n} layers; keep at least one")
    cfg = model.config.get_text_config()
    if drop and getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        # GPT-2 scales attention by 1/(layer_idx+1): renumbered layers would compute differently.
        raise MiOptError("this GPT-2 config sets scale_attn_by_inverse_layer_idx=True, whose attention "
                         "depends on the layer number; dropping layers would change every later layer")


def drop_layers_(model: nn.Module, drop: list[int]) -> nn.Module:
    """Delete the decoder layers `drop` (current numbering) in place and renumber the rest."""
    drop_set = set(drop)
    check_drop(model, sorted(drop_set))
    if not drop_set:
        return model
    adapter = get_adapter(model)
    kept = [layer for i, layer in enumerate(adapter.layers()) if i not in drop_set]
    kept_old = [i for i in range(adapter.n_layers()) if i not in drop_set]
    adapter.set_layers(nn.ModuleList(kept))
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    cfg = model.config.get_text_config()
    cfg.num_hidden_layers = len(kept)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        cfg.layer_types = [layer_types[i] for i in kept_old]
    return model
