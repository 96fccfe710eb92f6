"""Ablation interventions as hooks, and the mean activations that mean-ablation needs.

Each unit is ablated where its contribution enters the residual stream:
  layer      the block's output is replaced by its input (+ the mean residual update for mean)
  attn, mlp  the sublayer's output is replaced by zeros or its mean
  head, KV   the head's slice of the head-output projection's input (the adapter's head_output_proj) is
             replaced by zeros or its mean; a KV group ablates all heads that read it.
  neurons    the group's columns of the MLP output projection's input (every neuron's activation,
             the adapter's mlp_output_projection) are replaced by zeros or their means: zeroing
             them is exactly what slicing the neurons out of the MLP computes.
`rows` restricts an intervention to a slice of the batch, so several ablations can share
one forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mi_opt.arch import ArchAdapter
from mi_opt.hooks import Hook
from mi_opt.units import Unit, check_neurons

ABLATIONS = ("zero", "mean")


def _first(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _main(output):
    return output[0] if isinstance(output, tuple) else output


def _with_main(output, main: torch.Tensor):
    return (main, *output[1:]) if isinstance(output, tuple) else main


@dataclass
class MeanActivations:
    """Per-layer means over every calibration token (keys: ("layer"|"attn"|"mlp"|"heads"|"neurons", L))."""

    means: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def get(self, kind: str, layer: int) -> torch.Tensor:
        return self.means[(kind, layer)]


def mean_collection_hooks(adapter: ArchAdapter, sums: dict, counts: dict) -> list[Hook]:
    """Hooks that add each ablation point's activations into sums (float64)."""

    def accumulate(key, value: torch.Tensor) -> None:
        flat = value.detach().reshape(-1, value.shape[-1]).double()
        sums[key] = sums.get(key, 0) + flat.sum(0).cpu()
        counts[key] = counts.get(key, 0) + flat.shape[0]

    hooks = []
    for i, layer in enumerate(adapter.layers()):
        # .to(): under accelerate dispatch a layer's input may still sit on the previous layer's device.
        hooks.append(Hook(layer, lambda m, a, k, out, i=i: accumulate(
            ("layer", i), _main(out) - _first(a, k, "hidden_states").to(_main(out).device)), with_kwargs=True))
        hooks.append(Hook(adapter.attention(layer), lambda m, a, out, i=i: accumulate(("attn", i), _main(out))))
        hooks.append(Hook(adapter.mlp(layer), lambda m, a, out, i=i: accumulate(("mlp", i), _main(out))))
        hooks.append(Hook(adapter.head_output_proj(layer), lambda m, a, i=i: accumulate(("heads", i), a[0]),
                          kind="forward_pre"))
        hooks.append(Hook(adapter.mlp_output_projection(layer), lambda m, a, i=i: accumulate(("neurons", i), a[0]),
                          kind="forward_pre"))
    return hooks


def ablation_hooks(adapter: ArchAdapter, unit: Unit, ablation: str, means: MeanActivations | None,
                   rows: slice = slice(None)) -> list[Hook]:
    """Hooks that ablate one unit on the given batch rows."""
    layer = adapter.layers()[unit.layer]
    use_mean = ablation == "mean"

    if unit.kind == "layer":
        delta = means.get("layer", unit.layer) if use_mean else None

        def skip_block(module, args, kwargs, output):
            main = _main(output).clone()
            main[rows] = _first(args, kwargs, "hidden_states")[rows].to(main.device)  # dispatch: may differ
            if delta is not None:
                main[rows] += delta.to(main)
            return _with_main(output, main)
        return [Hook(layer, skip_block, with_kwargs=True)]

    if unit.kind in ("attn", "mlp"):
        module = adapter.attention(layer) if unit.kind == "attn" else adapter.mlp(layer)
        mean = means.get(unit.kind, unit.layer) if use_mean else None

        def replace_output(module, args, output):
            main = _main(output).clone()
            main[rows] = 0 if mean is None else mean.to(main)
            return _with_main(output, main)
        return [Hook(module, replace_output)]

    if unit.kind == "neurons":
        return _neuron_hooks(adapter, unit, means if use_mean else None, rows)

    geo = adapter.heads(unit.layer)
    heads = [unit.index] if unit.kind == "head" else range(unit.index * geo.group_size,
                                                           (unit.index + 1) * geo.group_size)
    cols = torch.cat([torch.arange(h * geo.head_dim, (h + 1) * geo.head_dim) for h in heads])
    mean = means.get("heads", unit.layer)[cols] if use_mean else None

    def replace_heads(module, args):
        x = args[0].clone()
        sub = x[rows]
        sub[..., cols.to(x.device)] = 0 if mean is None else mean.to(x)
        x[rows] = sub
        return (x, *args[1:])
    return [Hook(adapter.head_output_proj(layer), replace_heads, kind="forward_pre")]


def _neuron_hooks(adapter: ArchAdapter, unit: Unit, means: MeanActivations | None, rows: slice) -> list[Hook]:
    check_neurons(adapter, unit)  # a group past the MLP's width would index silently wrong columns
    layer = adapter.layers()[unit.layer]
    cols = slice(unit.index, unit.stop)  # a group is consecutive neurons: a view, no gather
    mean = means.get("neurons", unit.layer)[cols] if means is not None else None

    def replace_neurons(module, args):
        x = args[0].clone()
        x[rows, ..., cols] = 0 if mean is None else mean.to(x)
        return (x, *args[1:])
    return [Hook(adapter.mlp_output_projection(layer), replace_neurons, kind="forward_pre")]
