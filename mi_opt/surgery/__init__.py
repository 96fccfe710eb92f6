"""Apply a CompressionPlan to a model for real: `apply_(model, plan)` changes it in place.

Order: heads first, then MLP neurons, then quantization, then layer deletion. Plans number layers as the
original model did; doing the steps that address layers by number before any layer is
deleted keeps that numbering valid without remapping.
"""
from __future__ import annotations

from torch import nn

from mi_opt.errors import MiOptError
from mi_opt.handle import LoadedModel, as_loaded
from mi_opt.plan import CompressionPlan
from mi_opt.surgery.heads import plan_layouts, prune_heads_
from mi_opt.surgery.layers import check_drop, drop_layers_
from mi_opt.surgery.neurons import plan_keeps, prune_neurons_
from mi_opt.units import in_layers, resolve_linears


def check_plan(model: nn.Module | LoadedModel, plan: CompressionPlan) -> None:
    """Every reason the plan cannot apply to this model, raised before anything changes."""
    loaded = as_loaded(model)
    model, adapter = loaded.model, loaded.adapter
    expected = plan.model.get("fingerprint")
    if expected and expected != loaded.fingerprint:
        raise MiOptError(
            f"this plan was made for model {plan.model.get('spec') or '?'} (fingerprint {expected}), but the "
            f"given model's fingerprint is {loaded.fingerprint}: apply a plan to the exact model it was "
            "planned for (an already compressed or different checkpoint does not match)")
    n = adapter.n_layers()
    if plan.model.get("n_layers") not in (None, n):
        raise MiOptError(f"the plan is for a {plan.model['n_layers']}-layer model; this one has {n}")
    check_drop(model, plan.drop_layers)
    plan_layouts(model, {i: h for i, h in plan.prune_heads.items()}, plan.head_mode, plan.drop_layers)
    plan_keeps(model, plan.prune_neurons, plan.neuron_mode, plan.drop_layers)
    for key in plan.bits:
        check_bits_key(adapter, key)
    from mi_opt.quant import get_backend

    # widths, formats and tied weights the backend cannot carry out: refused before anything changes
    get_backend(plan.backend).check_model(model, plan.bits, plan.quant_type)


def check_bits_key(adapter, key: str) -> None:
    """The key parses, its layer exists and its module path names a module of that layer."""
    resolve_linears(adapter, key)


def apply_(model: nn.Module | LoadedModel, plan: CompressionPlan) -> nn.Module:
    """Remove heads and MLP neurons, quantize and remove layers as `plan` says; returns the same (bare) model.
    A handle is told its model changed."""
    loaded = as_loaded(model)
    check_plan(loaded, plan)
    model = loaded.model
    loaded.changed()  # whatever happens next, what was derived from the old weights is stale
    dropped = set(plan.drop_layers)
    prune_heads_(model, {i: h for i, h in plan.prune_heads.items() if i not in dropped}, plan.head_mode,
                 ignore_layers=dropped)
    prune_neurons_(model, plan.prune_neurons, plan.neuron_mode, ignore_layers=dropped)
    bits = {k: b for k, b in plan.bits.items() if not in_layers(k, dropped)}
    if any(b < 16 for b in bits.values()):
        from mi_opt.quant import QuantOptions, get_backend  # the backend imports its library only now

        get_backend(plan.backend).quantize_(model, bits, QuantOptions.of(plan))
    drop_layers_(model, plan.drop_layers)
    return model
