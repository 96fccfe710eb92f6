"""Every way mi-opt can score units, behind one signature and one registry.

    profile = SCORERS.get("attribution")(model, windows, config, calibration=..., model_spec=...)
    profile = run_scorer("block_influence", model, windows, {"batch_size": 8})

Each scorer returns an `ImportanceProfile` whose `delta_loss` ranks units (higher = more
important), so planners, reports and benchmarks treat them alike; `kl` is None where a scorer
measures no KL (profile schema v2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from mi_opt.errors import MiOptError
from mi_opt.options import parse_options
from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.profile.attribution import AttributionConfig, profile_attribution
from mi_opt.profile.baselines import (AngularDistanceConfig, BlockInfluenceConfig, RandomConfig,
                                      WeightMagnitudeConfig, profile_angular_distance,
                                      profile_block_influence, profile_random, profile_weight_magnitude)
from mi_opt.profile.finite import check_profile
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.profile.neuron_stats import ActivationConfig, WandaConfig, profile_activation, profile_wanda
from mi_opt.registry import Registry


@dataclass(frozen=True)
class Scorer:
    """A scoring function with its config type: fn(model, windows, config, calibration, model_spec, progress)."""

    name: str
    config_type: type
    fn: Callable[..., ImportanceProfile]
    needs_data: bool = True     # False: windows are ignored (weight magnitude, random)
    causal: bool = False        # True: scores are measured or estimated effects of ablation
    selects_units: bool = False  # True: fn takes units= (score only those keys, e.g. one shard)

    def make_config(self, options: dict[str, Any] | None = None):
        """The config from plain options (a recipe section, CLI flags); unknown keys and wrong types are an error."""
        return parse_options(self.config_type, dict(options or {}), f"scorer {self.name!r}")

    def __call__(self, model, windows: torch.Tensor | None, config=None, calibration: dict | None = None,
                 model_spec: str | None = None, progress: bool = True,
                 units: list[str] | None = None) -> ImportanceProfile:
        """units: the keys wanted; a scorer that cannot select scores them all (a superset)."""
        config = self.config_type() if config is None else config
        if not isinstance(config, self.config_type):
            raise MiOptError(f"scorer {self.name!r} takes a {self.config_type.__name__}, "
                             f"got {type(config).__name__}")
        if self.needs_data and (windows is None or len(windows) == 0):
            raise MiOptError(f"scorer {self.name!r} needs calibration windows; pass token windows (n x seq_len)")
        selection = {"units": units} if units is not None and self.selects_units else {}
        profile = self.fn(model, windows, config, calibration=calibration, model_spec=model_spec, progress=progress,
                          **selection)
        check_profile(profile, f"scorer {self.name!r}")
        return profile


SCORERS: Registry[Scorer] = Registry("scorer")

for _scorer in (
    Scorer("ablation", AblationConfig, profile_ablation, causal=True, selects_units=True),
    Scorer("attribution", AttributionConfig, profile_attribution, causal=True),
    Scorer("block_influence", BlockInfluenceConfig, profile_block_influence),
    Scorer("angular_distance", AngularDistanceConfig, profile_angular_distance),
    Scorer("weight_magnitude", WeightMagnitudeConfig, profile_weight_magnitude, needs_data=False),
    Scorer("random", RandomConfig, profile_random, needs_data=False),
    Scorer("activation", ActivationConfig, profile_activation),   # MLP neuron groups only
    Scorer("wanda", WandaConfig, profile_wanda),                 # MLP neuron groups only
):
    SCORERS.register(_scorer.name)(_scorer)


def run_scorer(name: str, model, windows: torch.Tensor | None, options: dict[str, Any] | None = None,
               calibration: dict | None = None, model_spec: str | None = None,
               progress: bool = True, units: list[str] | None = None) -> ImportanceProfile:
    """Look up a scorer by name, build its config from options, and score."""
    scorer = SCORERS.get(name)
    return scorer(model, windows, scorer.make_config(options), calibration=calibration,
                  model_spec=model_spec, progress=progress, units=units)
