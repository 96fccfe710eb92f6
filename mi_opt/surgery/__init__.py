"""Apply a CompressionPlan to a model for real: `apply_(model, plan)` changes it in place.

Order: heads first, then quantization, then layer deletion. Plans number layers as the
original model did; doing the steps that address layers by number before any layer is
deleted keeps that numbering valid without remapping.
"""
from __future__ import annotations

import re

from torch import nn

from mi_opt.arch import get_adapter
from mi_opt.artifacts import model_fingerprint
from mi_opt.errors import MiOptError
from mi_opt.plan import CompressionPlan
from mi_opt.surgery.heads import plan_layouts, prune_heads_
from mi_opt.surgery.layers import check_drop, drop_layers_

_BITS_KEY = re.compile(r"^L(\d+)(?:\.(.+))?$")


def check_plan(model: nn.Module, plan: CompressionPlan) -> None:
    """Every reason the plan cannot apply to this model, raised before anything changes."""
    expected = plan.model.get("fingerprint")
    if expected and expected != model_fingerprint(model):
        raise MiOptError(
            f"this plan was made for model {plan.model.get('spec') or '?'} (fingerprint {expected}), but the "
            f"given model's fingerprint is {model_fingerprint(model)}: apply a plan to the exact model it was "
            "planned for (an already compressed or different checkpoint does not match)")
    adapter = get_adapter(model)
    n = adapter.n_layers()
    if plan.model.get("n_layers") not in (None, n):
        raise MiOptError(f"the plan is for a {plan.model['n_layers']}-layer model; this one has {n}")
    check_drop(model, plan.drop_layers)
    plan_layouts(model, {i: h for i, h in plan.prune_heads.items()}, plan.head_mode, plan.drop_layers)
    for key in plan.bits:
        check_bits_key(adapter, key)


def check_bits_key(adapter, key: str) -> None:
    if key in ("embed", "lm_head"):
        return
    m = _BITS_KEY.match(key)
    if not m:
        raise MiOptError(f"unknown bits target {key!r}; use L<i>, L<i>.<module path> (e.g. L3.self_attn.q_proj), "
                         "embed or lm_head")
    layer = int(m.group(1))
    if not 0 <= layer < adapter.n_layers():
        raise MiOptError(f"bits target {key!r}: the model has layers 0..{adapter.n_layers() - 1}")
    path = m.group(2)
    if path is not None:
        names = dict(adapter.layers()[layer].named_modules())
        if path not in names:
            linear = sorted(adapter.linear_modules(adapter.layers()[layer]))
            raise MiOptError(f"bits target {key!r}: layer {layer} has no module {path!r}; its linear modules are "
                             f"{', '.join(linear)}")


def apply_(model: nn.Module, plan: CompressionPlan) -> nn.Module:
    """Remove heads, quantize and remove layers as `plan` says; returns the same model."""
    check_plan(model, plan)
    dropped = set(plan.drop_layers)
    prune_heads_(model, {i: h for i, h in plan.prune_heads.items() if i not in dropped}, plan.head_mode,
                 ignore_layers=dropped)
    bits = {k: b for k, b in plan.bits.items() if not _in_dropped_layer(k, dropped)}
    if any(b < 16 for b in bits.values()):
        from mi_opt.surgery.quantize import quantize_  # optional backend; imported only when needed

        quantize_(model, bits, plan.quant_type, plan.int8_threshold)
    drop_layers_(model, plan.drop_layers)
    return model


def _in_dropped_layer(key: str, dropped: set[int]) -> bool:
    m = _BITS_KEY.match(key)
    return bool(m) and int(m.group(1)) in dropped
