"""Layer skipping: delete the decoder layers whose removal hurts least.

One-shot ranks layers once by the profile's scores. Iterative drops the least important
layer(s), re-profiles what remains on the calibration windows, and repeats: once a layer is
gone the others' importance changes (neighbours often take over its role), which one-shot
scores cannot see.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from mi_opt.errors import MiOptError
from mi_opt.plan import CompressionPlan
from mi_opt.policy.base import PLANNERS, PlanContext, Planner, check_metric, unit_scores
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.units import parse_unit


@dataclass
class LayerSkipConfig:
    n_drop: int | None = None              # drop exactly this many layers, or
    target_params: int | None = None       # drop until the model has at most this many parameters, or
    target_fraction: float | None = None   # ... at most this fraction of its parameters
    metric: str = "delta_loss"             # "delta_loss" or "kl"
    iterative: bool = False                # re-profile the remaining layers after each step
    step: int = 1                          # iterative: layers dropped per round
    protect_first: int = 1                 # never drop the first n layers (they build the token representation)
    protect_last: int = 1                  # never drop the last n layers (they write the prediction)

    def __post_init__(self):
        given = [n for n in ("n_drop", "target_params", "target_fraction") if getattr(self, n) is not None]
        if len(given) != 1:
            raise MiOptError(f"layer-skip needs exactly one of n_drop, target_params, target_fraction; got {given or 'none'}")
        check_metric(self.metric)
        if self.n_drop is not None and self.n_drop < 0:
            raise MiOptError(f"n_drop must be >= 0, got {self.n_drop}")
        if self.target_fraction is not None and not 0 < self.target_fraction <= 1:
            raise MiOptError(f"target_fraction must be in (0, 1], got {self.target_fraction}")
        if self.target_params is not None and self.target_params <= 0:
            raise MiOptError(f"target_params must be > 0, got {self.target_params}")
        if self.step < 1 or self.protect_first < 0 or self.protect_last < 0:
            raise MiOptError("step must be >= 1 and protect_first / protect_last >= 0")


def _candidates(n_layers: int, config: LayerSkipConfig) -> list[int]:
    return [i for i in range(n_layers) if config.protect_first <= i < n_layers - config.protect_last]


def _done(dropped: list[int], config: LayerSkipConfig, ctx: PlanContext) -> bool:
    if config.n_drop is not None:
        return len(dropped) >= config.n_drop
    target = config.target_params if config.target_params is not None else config.target_fraction * ctx.cost.parameters
    return ctx.cost.after(dropped, {}) <= target


def _cannot_meet(config: LayerSkipConfig, ctx: PlanContext, n_candidates: int) -> MiOptError:
    if config.n_drop is not None:
        what = f"drop {config.n_drop} layers"
    else:
        what = (f"reach {config.target_params:,} parameters" if config.target_params is not None
                else f"reach {config.target_fraction:.0%} of the parameters")
    best = ctx.cost.after(_candidates(ctx.cost.n_layers, config), {})
    return MiOptError(
        f"layer-skip cannot {what}: only {n_candidates} of {ctx.cost.n_layers} layers may be dropped "
        f"(protect_first={config.protect_first}, protect_last={config.protect_last}), which leaves "
        f"{best:,} of {ctx.cost.parameters:,} parameters. Lower the budget or protect fewer layers.")


def choose_layers(scores: dict[int, float], config: LayerSkipConfig, ctx: PlanContext,
                  already: list[int] = (), limit: int | None = None) -> list[int]:
    """Least important candidate layers (original numbering) until the budget or `limit` is met."""
    dropped = list(already)
    pool = sorted((i for i in _candidates(ctx.cost.n_layers, config) if i not in dropped and i in scores),
                  key=lambda i: (scores[i], i))
    added = 0
    for i in pool:
        if _done(dropped, config, ctx) or (limit is not None and added >= limit):
            break
        dropped.append(i)
        added += 1
    return dropped


def _layer_scores(profile: ImportanceProfile, metric: str) -> dict[int, float]:
    return {parse_unit(k).layer: v for k, v in unit_scores(profile, "layer", metric).items()}


def _iterative(profile: ImportanceProfile, config: LayerSkipConfig, ctx: PlanContext) -> tuple[list[int], list]:
    from mi_opt.profile.ablation import AblationConfig, profile_ablation
    from mi_opt.surgery.layers import drop_layers_

    if ctx.windows is None:
        raise MiOptError("iterative layer-skip re-profiles after each step and needs calibration windows: "
                         "pass windows= to make_plan (the CLI rebuilds them from the profile's calibration)")
    ablation = AblationConfig(ablation=profile.method.get("ablation", "zero"), unit_kinds=("layer",),
                              batch_size=int(profile.method.get("batch_size", 4)))
    work = copy.deepcopy(ctx.model)  # the caller's model is never modified
    alive = list(range(ctx.cost.n_layers))  # original index of each current layer
    scores = _layer_scores(profile, config.metric)
    dropped: list[int] = []
    rounds = []
    while not _done(dropped, config, ctx):
        new = choose_layers(scores, config, ctx, already=dropped, limit=config.step)[len(dropped):]
        if not new:
            break
        rounds.append({"dropped": new, "scores": {f"L{i}": round(s, 6) for i, s in scores.items()}})
        dropped += new
        if _done(dropped, config, ctx):
            break
        drop_layers_(work, [alive.index(i) for i in new])
        alive = [i for i in alive if i not in new]
        fresh = profile_ablation(work, ctx.windows, ablation, progress=ctx.progress)
        scores = {alive[parse_unit(k).layer]: getattr(s, config.metric) for k, s in fresh.scores.items()}
    return dropped, rounds


def plan_layer_skip(profile: ImportanceProfile, config: LayerSkipConfig, ctx: PlanContext) -> CompressionPlan:
    if config.iterative:
        dropped, rounds = _iterative(profile, config, ctx)
    else:
        dropped, rounds = choose_layers(_layer_scores(profile, config.metric), config, ctx), []
    if not _done(dropped, config, ctx):
        raise _cannot_meet(config, ctx, len(_candidates(ctx.cost.n_layers, config)))
    budget = {k: v for k, v in (("n_drop", config.n_drop), ("target_params", config.target_params),
                                ("target_fraction", config.target_fraction)) if v is not None}
    return CompressionPlan(model={}, drop_layers=dropped, budget=budget,
                           predicted=ctx.cost.predicted(dropped, {}),
                           planner={"rounds": rounds} if rounds else {})


PLANNERS.register("layer-skip")(Planner(LayerSkipConfig, plan_layer_skip,
                                        "drop the least important decoder layers"))
