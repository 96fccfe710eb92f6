"""Exact parameter and byte counts of a model after a plan, without touching the model.

Planners need to know what a choice saves; counting from the live modules (not from config
formulas) keeps the prediction equal to what surgery will leave.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mi_opt.arch import HeadGeometry, get_adapter
from mi_opt.surgery.heads import head_layout


@dataclass(frozen=True)
class ModelCost:
    parameters: int                 # whole model, tied weights counted once
    bytes_per_param: float
    layer_params: tuple[int, ...]   # each decoder layer
    geometry: tuple[HeadGeometry, ...]
    per_query_head: tuple[int, ...]  # q rows (+bias) and o columns of one query head, per layer
    per_kv_head: tuple[int, ...]     # k and v rows (+bias) of one KV head, per layer
    mlp_width: tuple[int, ...] = ()  # intermediate neurons of each layer's MLP
    per_neuron: tuple[int, ...] = ()  # input rows (+bias) and output column of one neuron, per layer

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelCost":
        adapter = get_adapter(model)
        params = list(model.parameters())
        layer_params, geometry, per_q, per_kv, widths, per_neuron = [], [], [], [], [], []
        for i, layer in enumerate(adapter.layers()):
            layer_params.append(sum(p.numel() for p in layer.parameters()))
            geometry.append(adapter.heads(i))
            q, kv = adapter.head_params(i)
            per_q.append(q)
            per_kv.append(kv)
            widths.append(adapter.mlp_width(i))
            per_neuron.append(adapter.neuron_params(i))
        return cls(parameters=sum(p.numel() for p in params),
                   bytes_per_param=params[0].element_size() if params else 4.0,
                   layer_params=tuple(layer_params), geometry=tuple(geometry),
                   per_query_head=tuple(per_q), per_kv_head=tuple(per_kv),
                   mlp_width=tuple(widths), per_neuron=tuple(per_neuron))

    @property
    def n_layers(self) -> int:
        return len(self.layer_params)

    def layer_after_heads(self, layer: int, pruned: list[int]) -> int:
        """Parameters of `layer` once query heads `pruned` are deleted (K/V regrouping included)."""
        geo = self.geometry[layer]
        if not pruned:
            return self.layer_params[layer]
        lay = head_layout(geo, pruned)
        return (self.layer_params[layer] - (geo.n_heads - lay.n_heads) * self.per_query_head[layer]
                - (geo.n_kv_heads - lay.n_kv_heads) * self.per_kv_head[layer])

    @property
    def decoder_params(self) -> int:
        """Parameters of all decoder layers (what width and depth budgets are a share of)."""
        return sum(self.layer_params)

    def after(self, drop_layers: list[int], prune_heads: dict[int, list[int]],
              prune_neurons: dict[int, list[int]] | None = None) -> int:
        """Whole-model parameters after dropping layers, pruning heads and MLP neurons (original numbering)."""
        prune_neurons = prune_neurons or {}
        total = self.parameters
        for i in range(self.n_layers):
            if i in drop_layers:
                total -= self.layer_params[i]
                continue
            if prune_heads.get(i):
                total -= self.layer_params[i] - self.layer_after_heads(i, prune_heads[i])
            total -= len(prune_neurons.get(i, ())) * self.per_neuron[i]
        return total

    def predicted(self, drop_layers: list[int], prune_heads: dict[int, list[int]],
                  prune_neurons: dict[int, list[int]] | None = None) -> dict:
        prune_neurons = prune_neurons or {}
        params = self.after(drop_layers, prune_heads, prune_neurons)
        heads = [0 if i in drop_layers else self.geometry[i].n_heads - len(prune_heads.get(i, []))
                 for i in range(self.n_layers)]
        mlp = [self.mlp_width[i] - len(prune_neurons.get(i, ())) for i in range(self.n_layers)]
        return {"parameters_before": self.parameters, "parameters": params,
                "parameter_fraction": round(params / self.parameters, 6),
                "bytes_before": int(self.parameters * self.bytes_per_param),
                "bytes": int(params * self.bytes_per_param),
                "n_layers": self.n_layers - len(drop_layers),
                "heads_per_layer": [h for i, h in enumerate(heads) if i not in drop_layers],
                "mlp_sizes": [m for i, m in enumerate(mlp) if i not in drop_layers]}
