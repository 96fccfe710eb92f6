"""Planners: from an ImportanceProfile and a budget to a CompressionPlan.

    plan = make_plan(profile, "layer-skip", {"n_drop": 6}, model)

Planners register themselves in `PLANNERS` (see base.py for the protocol); importing this
package imports every built-in planner.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch
from torch import nn

from mi_opt.errors import MiOptError
from mi_opt.handle import LoadedModel, as_loaded
from mi_opt.plan import CompressionPlan
from mi_opt.policy.base import PLANNERS, PlanContext, Planner, parse_config
from mi_opt.policy.cost import ModelCost
from mi_opt.profile.finite import check_profile
from mi_opt.profile.importance import ImportanceProfile

for _name in ("layer_skip", "head_prune", "combined", "bits", "width_prune", "joint_prune"):
    try:
        importlib.import_module(f"mi_opt.policy.{_name}")
    except ModuleNotFoundError as err:
        # bits.py is built separately; until it exists the other planners still work.
        if err.name != f"mi_opt.policy.{_name}":
            raise

__all__ = ["PLANNERS", "Planner", "PlanContext", "make_plan"]


def _model_for(profile: ImportanceProfile, model: nn.Module | LoadedModel | None) -> LoadedModel:
    if model is None:
        spec = profile.model.get("spec")
        if not spec:
            raise MiOptError("make_plan needs the model to count parameters, and the profile records no "
                             "model spec: pass model=")
        from mi_opt.models import load

        model = load(spec)
    loaded = as_loaded(model)
    expected = profile.model.get("fingerprint")
    if expected and expected != loaded.fingerprint:
        raise MiOptError(f"the profile was measured on model fingerprint {expected}, but the given model's is "
                         f"{loaded.fingerprint}: plan with the model the profile scored")
    return loaded


def make_plan(profile: ImportanceProfile, planner_name: str, config: Any = None,
              model: nn.Module | LoadedModel | None = None, windows: torch.Tensor | None = None,
              progress: bool = True) -> CompressionPlan:
    """Run one registered planner. `model` (a bare model or a handle; loaded from the profile's
    spec when None) is only read."""
    planner = PLANNERS.get(planner_name)
    cfg = parse_config(planner.config_cls, config)
    check_profile(profile)  # NaN scores sort arbitrarily: a plan from them would drop layers at random
    model = _model_for(profile, model).model
    ctx = PlanContext(model=model, cost=ModelCost.from_model(model), windows=windows, progress=progress)
    plan = planner.fn(profile, cfg, ctx)
    check_leaves_a_model(plan, ctx.cost)
    plan.model = {"spec": profile.model.get("spec"), "fingerprint": profile.model.get("fingerprint"),
                  "model_type": profile.model.get("model_type"), "n_layers": ctx.cost.n_layers}
    plan.planner = {"name": planner_name, "config": dataclasses.asdict(cfg), **plan.planner}
    plan.profile = {"fingerprint": profile.model.get("fingerprint"), "created": profile.created,
                    "method": {k: profile.method.get(k) for k in ("scorer", "ablation", "engine")},
                    "calibration": profile.calibration}
    return plan


def check_leaves_a_model(plan: CompressionPlan, cost: ModelCost) -> None:
    """Refuse a plan that deletes every layer, or every head or MLP neuron of a layer it keeps. apply would
    refuse it too, but only after the plan was written and handed on; a planner reaches one
    when protect_first / protect_last are 0 and the budget asks for everything."""
    kept = [i for i in range(cost.n_layers) if i not in set(plan.drop_layers)]
    if not kept:
        raise MiOptError(f"the plan would drop all {cost.n_layers} layers, leaving no model; lower the budget "
                         "(or protect a layer with protect_first / protect_last)")
    for layer, heads in plan.prune_heads.items():
        if int(layer) in kept and len(set(heads)) >= cost.geometry[int(layer)].n_heads:
            raise MiOptError(f"the plan would remove all {cost.geometry[int(layer)].n_heads} heads of layer "
                             f"{layer}; lower the head budget, or drop that layer instead")
    for layer, neurons in plan.prune_neurons.items():
        if int(layer) in kept and len(set(neurons)) >= cost.mlp_width[int(layer)]:
            raise MiOptError(f"the plan would remove all {cost.mlp_width[int(layer)]} MLP neurons of layer {layer}; "
                             "lower the width budget, or drop that layer instead")
