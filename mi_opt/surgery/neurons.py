"""Remove MLP intermediate neurons physically: rows of the input projections, columns of the output.

Deleting neuron j removes its term act(gate_j x) * (up_j x) * down[:, j] from the MLP's output,
which is exactly what zeroing its activation does: the sliced model computes the zero-ablated
one's logits. "uniform" mode keeps the same number of neurons in every layer, so the config's
single intermediate_size says it and plain transformers loads the checkpoint; "free" lets each
layer keep its own count (loaded by mi_opt.load_compressed).

A plan may not delete every neuron of a layer: an MLP of width 0 is not a module transformers
builds. Dropping the whole layer is what such a plan means; the error says so.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.surgery.request import checked_adapter
from mi_opt.units import WIDTH_MODES


def plan_keeps(model: nn.Module, prune: dict[int, list[int]], mode: str,
               ignore_layers: Iterable[int] = ()) -> dict[int, torch.Tensor]:
    """Check a neuron-pruning request (current layer numbering) and return each layer's kept neurons.

    `ignore_layers` are about to be deleted: their neurons are not checked or pruned, and the
    uniform check skips them.
    """
    adapter = checked_adapter(model, prune, mode, WIDTH_MODES, "MLP neurons")
    n = adapter.n_layers()
    ignore = set(ignore_layers)
    keeps = {}
    for i, neurons in prune.items():
        if i in ignore or not neurons:
            continue
        _check_full_precision(adapter, i)
        width = adapter.mlp_width(i)
        gone = set(neurons)
        outside = sorted(j for j in gone if not 0 <= j < width)
        if outside:
            raise MiOptError(f"layer {i}: MLP neuron(s) {outside[:5]} do not exist; it has neurons 0..{width - 1}")
        if len(gone) == width:
            raise MiOptError(f"layer {i}: the plan removes all {width} MLP neurons; keep at least one, or drop "
                             "the layer instead (drop_layers)")
        keeps[i] = torch.tensor([j for j in range(width) if j not in gone], dtype=torch.long)
    if mode == "uniform" and keeps:
        sizes = {len(keeps[i]) if i in keeps else adapter.mlp_width(i) for i in range(n) if i not in ignore}
        if len(sizes) > 1:
            raise MiOptError(
                "neuron_mode 'uniform' needs the same MLP size in every layer (so plain transformers can load "
                f"it); this plan leaves sizes {sorted(sizes)}. Use neuron_mode 'free' (loads with "
                "mi_opt.load_compressed) or a uniform planner.")
    return keeps


def _check_full_precision(adapter, layer_index: int) -> None:
    """Refuse, before any layer is sliced, an MLP holding a quantized projection: bitsandbytes'
    packed weights are not rows and columns to slice (apply_ prunes neurons before it quantizes)."""
    layer = adapter.layers()[layer_index]
    projections = [*adapter.mlp_input_projections(layer), adapter.mlp_output_projection(layer)]
    quantized = [type(m).__name__ for m in projections if not adapter.is_full_precision_linear(m)]
    if quantized:
        raise MiOptError(f"layer {layer_index}: cannot prune MLP neurons of a quantized layer "
                         f"({', '.join(quantized)}); "
                         "prune neurons before quantizing (apply_ does both in that order, from the unquantized model)")


def mlp_sizes(model: nn.Module, ignore_layers: Iterable[int] = ()) -> list[int]:
    """Intermediate neurons of every layer not in `ignore_layers`."""
    adapter = get_adapter(model)
    ignore = set(ignore_layers)
    return [adapter.mlp_width(i) for i in range(adapter.n_layers()) if i not in ignore]


def prune_neurons_(model: nn.Module, prune: dict[int, list[int]], mode: str = "free",
                   ignore_layers: Iterable[int] = ()) -> dict[int, torch.Tensor]:
    """Delete MLP neurons in place: `prune` maps a layer (current numbering) to its neuron indices."""
    keeps = plan_keeps(model, prune, mode, ignore_layers)
    adapter = get_adapter(model)
    for i, keep in keeps.items():
        adapter.slice_mlp_(i, keep)
    if keeps:
        adapter.record_mlp_sizes_(set(mlp_sizes(model, ignore_layers)))
    return keeps


def reshape_mlps_(model: nn.Module, sizes: list[int]) -> None:
    """Give every layer's MLP the width in `sizes`, with placeholder weights.

    Used by the loader: a freshly built model gets the pruned widths before the saved weights
    are loaded into it.
    """
    adapter = get_adapter(model)
    if len(sizes) != adapter.n_layers():
        raise MiOptError(f"MLP sizes list {len(sizes)} layers but the model has {adapter.n_layers()}")
    for i, size in enumerate(sizes):
        width = adapter.mlp_width(i)
        if size == width:
            continue
        if not 0 < size < width:
            raise MiOptError(f"layer {i}: saved MLP size {size} does not fit the config's {width} neurons")
        adapter.slice_mlp_(i, torch.arange(size))
