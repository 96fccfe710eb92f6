"""The per-layer shapes an export records, who can rebuild them, and rebuilding them on load.

An export's sidecar says, per layer, the (query, KV) heads and the MLP intermediate size
(`ModelInfo.shape()`). Plain transformers builds every layer from the config's single values,
so it loads a checkpoint only when each layer matches them: after uniform head and neuron
pruning the config was rewritten to say so (`record_head_shapes_`, `record_mlp_sizes_`); after
free pruning the layers differ and `load_compressed` first gives a freshly built model the
recorded shapes (`rebuild_shapes_`), then loads the weights into it.
"""
from __future__ import annotations

from torch import nn

from mi_opt.arch import get_adapter


def loader_reason(model: nn.Module, shapes: dict, quantization: dict | None) -> str | None:
    """Why plain `from_pretrained` cannot rebuild this checkpoint (every reason, joined), or None if it can."""
    adapter = get_adapter(model)
    reasons = [adapter.head_shapes_unloadable([tuple(h) for h in shapes["heads"]]),
               adapter.mlp_sizes_unloadable(shapes["mlp_sizes"])]
    if quantization and quantization.get("loader") != "transformers":
        reasons.append(quantization.get("loader_reason") or "mixed bit widths or a quantized lm_head")
    return "; ".join(r for r in reasons if r) or None


def rebuild_shapes_(model: nn.Module, sidecar: dict) -> None:
    """Give a model built from the export's config the per-layer shapes its sidecar records
    (placeholder weights, to be overwritten). Sidecars older than neuron pruning (version 1)
    record no MLP sizes: their MLPs are as the config says."""
    from mi_opt.surgery.heads import reshape_heads_
    from mi_opt.surgery.neurons import reshape_mlps_

    reshape_heads_(model, [tuple(h) for h in sidecar["heads"]])
    if sidecar.get("mlp_sizes") is not None:
        reshape_mlps_(model, list(sidecar["mlp_sizes"]))
