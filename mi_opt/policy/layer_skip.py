"""Layer skipping: delete the decoder layers whose removal hurts least.

One-shot ranks layers once by the profile's scores. Iterative drops the least important
layer(s), re-scores what remains on the calibration windows, and repeats: once a layer is
gone the others' importance changes (neighbours often take over its role), which one-shot
scores cannot see. Beam search keeps several candidate sets per depth (layer_search.py).

Budgets: a layer count, a parameter count or fraction, or a decode-latency fraction
(measured on this machine, see latency.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mi_opt.errors import MiOptError
from mi_opt.plan import CompressionPlan
from mi_opt.policy.latency import measure_layer_latency
from mi_opt.policy.layer_search import beam, greedy
from mi_opt.policy.base import PLANNERS, PlanContext, Planner, check_metric, rescore_options, unit_scores
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.units import parse_unit


BUDGETS = ("n_drop", "target_params", "target_fraction", "target_latency_fraction")


@dataclass
class LayerSkipConfig:
    n_drop: int | None = None              # drop exactly this many layers, or
    target_params: int | None = None       # drop until the model has at most this many parameters, or
    target_fraction: float | None = None   # ... at most this fraction of its parameters, or
    target_latency_fraction: float | None = None  # ... at most this fraction of its measured decode latency
    metric: str = "delta_loss"             # "delta_loss" or "kl"
    iterative: bool = False                # re-score the remaining layers after each step
    step: int = 1                          # iterative: layers dropped per round
    rescore: str = "ablation"              # iterative: the registered scorer that re-scores each round
    candidates: int | None = None          # iterative/beam: re-score only this many lowest-ranked layers
    beam_width: int = 1                    # > 1: beam search over drop sets by calibration loss
    protect_first: int = 1                 # never drop the first n layers (they build the token representation)
    protect_last: int = 1                  # never drop the last n layers (they write the prediction)

    def __post_init__(self):
        given = [n for n in BUDGETS if getattr(self, n) is not None]
        if len(given) != 1:
            raise MiOptError(f"layer-skip needs exactly one of {', '.join(BUDGETS)}; got {given or 'none'}")
        check_metric(self.metric)
        if self.n_drop is not None and self.n_drop < 0:
            raise MiOptError(f"n_drop must be >= 0, got {self.n_drop}")
        if self.target_fraction is not None and not 0 < self.target_fraction <= 1:
            raise MiOptError(f"target_fraction must be in (0, 1], got {self.target_fraction}")
        if self.target_params is not None and self.target_params <= 0:
            raise MiOptError(f"target_params must be > 0, got {self.target_params}")
        if self.target_latency_fraction is not None and not 0 < self.target_latency_fraction <= 1:
            raise MiOptError(f"target_latency_fraction must be in (0, 1], got {self.target_latency_fraction}")
        if self.step < 1 or self.protect_first < 0 or self.protect_last < 0:
            raise MiOptError("step must be >= 1 and protect_first / protect_last >= 0")
        if self.candidates is not None and self.candidates < 1:
            raise MiOptError(f"candidates must be >= 1 (or None for all layers), got {self.candidates}")
        if self.beam_width < 1:
            raise MiOptError(f"beam_width must be >= 1, got {self.beam_width}")
        if self.beam_width > 1 and self.metric != "delta_loss":
            raise MiOptError("beam search ranks drop sets by their calibration loss, which only delta_loss adds up "
                             "to; set metric: delta_loss (or beam_width: 1)")
        from mi_opt.profile.scorers import SCORERS

        SCORERS.get(self.rescore)  # an unknown name fails here, with suggestions


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


def _search(profile: ImportanceProfile, config: LayerSkipConfig, ctx: PlanContext) -> tuple[list[int], list]:
    if ctx.windows is None:
        raise MiOptError("iterative and beam layer-skip re-score the model as it shrinks and need calibration "
                         "windows: pass windows= to make_plan (the CLI rebuilds them from the profile's calibration)")
    pool = _candidates(ctx.cost.n_layers, config)
    if config.beam_width > 1:
        depth = config.n_drop if config.n_drop is not None else next(
            (d for d in range(len(pool) + 1) if _done(sorted(pool, key=lambda i: -ctx.cost.layer_params[i])[:d],
                                                     config, ctx)), len(pool))
        if depth > len(pool):
            raise _cannot_meet(config, ctx, len(pool))
        return beam(pool, depth, config.beam_width, ctx.model, ctx.windows,
                    rescore_options(profile, "ablation"), config.candidates, ctx.progress)

    def choose(scores: dict[int, float], dropped: list[int]) -> list[int]:
        return choose_layers(scores, config, ctx, already=dropped, limit=config.step)

    # `metric` is what the re-scoring measures. A non-causal profile (block influence) has only
    # its one score, stored as delta_loss: that score is then the first round's ranking.
    first = config.metric if profile.has_metric(config.metric) or not config.rescore else "delta_loss"
    return greedy(_layer_scores(profile, first), pool, choose, lambda d: _done(d, config, ctx), ctx.model,
                  ctx.windows, config.rescore, rescore_options(profile, config.rescore), config.metric,
                  config.candidates, ctx.progress)


def plan_layer_skip(profile: ImportanceProfile, config: LayerSkipConfig, ctx: PlanContext) -> CompressionPlan:
    budget = {k: getattr(config, k) for k in BUDGETS if getattr(config, k) is not None}
    latency = None
    if config.target_latency_fraction is not None:
        latency = measure_layer_latency(ctx.model)
        config = dataclasses.replace(config, n_drop=latency.layers_to_drop(config.target_latency_fraction),
                                     target_latency_fraction=None)
    if config.iterative or config.beam_width > 1:
        dropped, rounds = _search(profile, config, ctx)
    else:
        dropped, rounds = choose_layers(_layer_scores(profile, config.metric), config, ctx), []
    if not _done(dropped, config, ctx):
        error = _cannot_meet(config, ctx, len(_candidates(ctx.cost.n_layers, config)))
        if latency is not None:
            error = MiOptError(f"{error} (the latency budget needs {config.n_drop} layers dropped: measured "
                               f"{latency.full_ms:.2f} ms/token, {latency.per_layer_ms:.3f} ms per layer)")
        raise error
    predicted = ctx.cost.predicted(dropped, {})
    if latency is not None:
        predicted["decode_ms_per_token"] = round(latency.after(len(dropped)), 4)
        predicted["latency_model"] = latency.to_dict()
    return CompressionPlan(model={}, drop_layers=dropped, budget=budget, predicted=predicted,
                           planner={"rounds": rounds} if rounds else {})


PLANNERS.register("layer-skip")(Planner(LayerSkipConfig, plan_layer_skip,
                                        "drop the least important decoder layers"))
