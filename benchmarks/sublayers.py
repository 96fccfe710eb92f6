"""Removing attention or MLP sublayers separately (the finer-unit arm of benchmarks/scorers.py).

A removed sublayer is replaced by a module that adds nothing to the residual stream, which
is exactly its zero ablation, with its weights deleted. This lives with the benchmark, not
in mi_opt.surgery: the scorer benchmark measures whether finer units pay for themselves
before the product commits to a checkpoint format for them.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from mi_opt.arch import get_adapter
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.profile.cost import measured_forward_equivalents
from mi_opt.units import parse_unit


class RemovedSublayer(nn.Module):
    """Stands in for a deleted attention or MLP block: its contribution is zero."""

    def __init__(self, attention: bool):
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states=None, *args, **kwargs):
        x = hidden_states if hidden_states is not None else args[0]
        zeros = torch.zeros_like(x)
        return (zeros, None) if self.attention else zeros


def sublayer_params(model, key: str) -> int:
    adapter = get_adapter(model)
    unit = parse_unit(key)
    layer = adapter.layers()[unit.layer]
    module = adapter.attention(layer) if unit.kind == "attn" else adapter.mlp(layer)
    return sum(p.numel() for p in module.parameters())


def without_sublayers(model, keys: list[str]):
    """Delete the sublayers `keys` ("L3.attn", "L7.mlp") in place."""
    adapter = get_adapter(model)
    for key in keys:
        unit = parse_unit(key)
        layer = adapter.layers()[unit.layer]
        if unit.kind == "attn":
            layer.self_attn = RemovedSublayer(attention=True)
        else:
            layer.mlp = RemovedSublayer(attention=False)
    return model


def sublayer_search(model, windows: torch.Tensor, param_budgets: list[int], labels: list[str],
                    candidates: int = 6) -> dict:
    """Greedy removal of the sublayer with the least exact KL per parameter, re-scoring the
    `candidates` lowest-ranked (by the first profile) after each removal, until each budget
    of removed parameters is reached. Returns {label: {"plan", "cost"}} as scorers.py records."""
    config = AblationConfig(unit_kinds=("attn", "mlp"))
    work_model = copy.deepcopy(model)
    started = time.perf_counter()
    first = profile_ablation(work_model, windows, config, progress=True)
    work = measured_forward_equivalents(first.cost)
    params = {k: sublayer_params(model, k) for k in first.units()}
    starting = {k: first.score(k, "kl") / params[k] for k in params}
    scores = dict(starting)
    removed, removed_params, out = [], 0, {}
    targets = sorted(zip(param_budgets, labels))
    with tqdm(total=max(param_budgets), desc="sublayer search", unit="param") as bar:
        while targets:
            key = min(scores, key=lambda k: (scores[k], k))
            removed.append(key)
            removed_params += params[key]
            bar.update(params[key])
            without_sublayers(work_model, [key])
            while targets and removed_params >= targets[0][0]:
                _, label = targets.pop(0)
                out[label] = {"plan": {"remove": sorted(removed, key=parse_unit)},
                              "cost": {"wall_s": round(time.perf_counter() - started, 2),
                                       "forward_equivalents": round(work, 2)}}
            if not targets:
                break
            remaining = sorted((k for k in params if k not in removed), key=lambda k: (starting[k], k))
            fresh = profile_ablation(work_model, windows, config, units=remaining[:candidates], progress=False)
            work += measured_forward_equivalents(fresh.cost)
            scores = {k: fresh.score(k, "kl") / params[k] for k in fresh.units()}
    return out
