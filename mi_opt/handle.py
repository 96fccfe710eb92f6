"""One handle on a loaded model: the model, its tokenizer, its adapter and a description.

`LoadedModel` is what stages pass around instead of a bare (model, tokenizer) pair, so the
adapter is looked up once and the description (fingerprint, family, geometry, input device,
dtype) is computed once. The fingerprint hashes every weight, so it is taken when first
asked for and must be refreshed (`changed()`) after anything edits the model in place.

`ModelInfo` is that description; `summary()` and `shape()` are the two views artifacts store
(profiles, sensitivity files and evaluations record the summary; exports record the shape).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from mi_opt.arch import ArchAdapter, get_adapter
from mi_opt.artifacts import model_fingerprint


def parameter_count(model: nn.Module) -> int:
    """Weights the model computes with, tied ones once. A packed 4-bit weight holds two per stored
    byte, so it counts as its module's in x out, not as its stored elements."""
    total, seen = 0, set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            packed = name == "weight" and getattr(p, "quant_state", None) is not None
            total += module.in_features * module.out_features if packed else p.numel()
    return total


def mlp_sizes(adapter: ArchAdapter) -> list[int]:
    """MLP intermediate neurons of every layer; 0 where the MLP itself was replaced by a stand-in."""
    sizes = []
    for i in range(adapter.n_layers()):
        try:
            sizes.append(adapter.mlp_width(i))
        except AttributeError:  # a stand-in without projections: no neurons
            sizes.append(0)
    return sizes


@dataclass(frozen=True)
class ModelInfo:
    spec: str | None
    fingerprint: str
    model_type: str
    family: str
    n_layers: int
    heads: list[int]             # query heads per layer (0 where attention was removed)
    kv_heads: list[int]
    head_dim: int | None
    mlp_sizes: list[int]         # MLP intermediate neurons per layer (neuron pruning changes them)
    dtype: str                   # of the first parameter, e.g. "float32"
    parameters: int
    input_device: str            # where token ids go

    @classmethod
    def of(cls, model: nn.Module, spec: str | None = None, adapter: ArchAdapter | None = None,
           fingerprint: str | None = None) -> "ModelInfo":
        adapter = adapter or get_adapter(model)
        heads = adapter.heads_per_layer()
        first = next((i for i, n in enumerate(heads) if n), None)
        return cls(spec=spec, fingerprint=fingerprint or model_fingerprint(model),
                   model_type=model.config.model_type, family=adapter.family, n_layers=adapter.n_layers(),
                   heads=heads, kv_heads=[adapter.heads(i).n_kv_heads if n else 0 for i, n in enumerate(heads)],
                   head_dim=adapter.heads(first).head_dim if first is not None else None,
                   mlp_sizes=mlp_sizes(adapter),
                   dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                   parameters=parameter_count(model), input_device=str(adapter.input_device()))

    def summary(self, spec: str | None = None) -> dict:
        """The model record of profiles and sensitivity files (spec: how this artifact names it)."""
        return {"spec": spec if spec is not None else self.spec, "fingerprint": self.fingerprint,
                "model_type": self.model_type, "family": self.family, "n_layers": self.n_layers,
                "heads": self.heads, "kv_heads": self.kv_heads, "parameters": self.parameters}


    def evaluated(self, spec: str | None = None) -> dict:
        """The model record of an evaluation."""
        return {"spec": spec if spec is not None else self.spec, "fingerprint": self.fingerprint,
                "model_type": self.model_type, "family": self.family, "n_layers": self.n_layers,
                "heads": self.heads, "dtype": self.dtype}

    def shape(self) -> dict:
        """What a loader must rebuild: layers, (query, KV) heads and MLP sizes per layer (an export's sidecar)."""
        return {"family": self.family, "model_type": self.model_type, "n_layers": self.n_layers,
                "heads": [[h, kv] for h, kv in zip(self.heads, self.kv_heads)], "head_dim": self.head_dim,
                "mlp_sizes": self.mlp_sizes, "dtype": self.dtype, "parameters": self.parameters}


def model_summary(model, adapter: ArchAdapter | None, spec: str | None) -> dict:
    """The model record a profile stores (spec, fingerprint, family, geometry, parameters).
    `model` may be a LoadedModel: then nothing is recomputed."""
    if isinstance(model, LoadedModel):
        return model.info.summary(spec)
    return ModelInfo.of(model, spec, adapter).summary()


@dataclass
class LoadedModel:
    """A model with everything stages re-derived before: tokenizer, adapter, info."""

    model: nn.Module
    tokenizer: object = None
    spec: str | None = None
    _info: ModelInfo | None = field(default=None, init=False, repr=False)

    @cached_property
    def adapter(self) -> ArchAdapter:
        return get_adapter(self.model)

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            self._info = ModelInfo.of(self.model, self.spec, self.adapter)
        return self._info

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def input_device(self) -> torch.device:
        return torch.device(self.info.input_device)

    def changed(self) -> "LoadedModel":
        """Forget what was derived from the weights and layout, after an in-place edit."""
        self._info = None
        self.__dict__.pop("adapter", None)
        return self


def as_loaded(model, spec: str | None = None) -> LoadedModel:
    """A LoadedModel for either a bare model or a handle (the handle itself)."""
    return model if isinstance(model, LoadedModel) else LoadedModel(model, spec=spec)


def bare(model) -> nn.Module:
    """The nn.Module of a bare model or a handle."""
    return model.model if isinstance(model, LoadedModel) else model
