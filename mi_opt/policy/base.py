"""What every planner shares: the registry, the context a planner runs in, config parsing.

A planner is a config dataclass plus a function `(profile, config, ctx) -> CompressionPlan`.
`make_plan` fills in the plan's provenance (model, planner, profile), so planners only decide.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from mi_opt.errors import MiOptError
from mi_opt.options import parse_options
from mi_opt.plan import CompressionPlan
from mi_opt.policy.cost import ModelCost
from mi_opt.profile.importance import METRICS, ImportanceProfile
from mi_opt.registry import Registry


@dataclass
class PlanContext:
    model: nn.Module                    # the uncompressed model the profile scored (never modified)
    cost: ModelCost
    windows: torch.Tensor | None = None  # calibration windows, for planners that re-profile
    progress: bool = True


@dataclass(frozen=True)
class Planner:
    config_cls: type
    fn: Callable[[ImportanceProfile, Any, PlanContext], CompressionPlan]
    description: str


PLANNERS: Registry[Planner] = Registry("planner")


def parse_config(cls: type, config: Any) -> Any:
    """A planner config from None (defaults), a dict (unknown keys and wrong types rejected) or an instance."""
    return parse_options(cls, config, cls.__name__)


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise MiOptError(f"metric must be one of {METRICS}, got {metric!r}")


def unit_scores(profile: ImportanceProfile, kind: str, metric: str) -> dict[str, float]:
    """Scores of every unit of one kind, or an error saying how to profile them."""
    keys = profile.units(kind)
    if not keys:
        raise MiOptError(f"the profile has no {kind} scores; profile with --units including {kind!r}")
    missing = [k for k in keys if profile.score(k, metric) is None]
    if missing:
        scorer = profile.method.get("scorer", "its scorer")
        raise MiOptError(f"the profile's scorer {scorer!r} measures no {metric} ({missing[0]} and "
                         f"{len(missing) - 1} more have none); plan with metric 'delta_loss', or profile with "
                         f"a causal scorer (ablation, attribution)")
    return {k: profile.score(k, metric) for k in keys}


def rescore_options(profile: ImportanceProfile, scorer: str) -> dict:
    """Settings for re-scoring a shrunk model, taken from the profile the plan starts from
    (ablation kind, batch size) where the re-scoring scorer has such options."""
    from mi_opt.profile.scorers import SCORERS

    fields = {f.name for f in dataclasses.fields(SCORERS.get(scorer).config_type)}
    return {k: profile.method[k] for k in ("ablation", "batch_size") if k in fields and k in profile.method}
