"""Stop at the first non-finite loss or score, naming where it appeared.

A model with corrupted weights (or an fp16 overflow) profiles to a NaN base loss and NaN
scores; sorting NaNs ranks units arbitrarily, so a planner would still drop layers from
them. Every scorer's profile passes `check_profile`, and the ablation engines' per-batch
values pass `check_batches`, so the error names the first batch and unit.
"""
from __future__ import annotations

import math

from mi_opt.errors import MiOptError

CAUSE = "the model's own outputs are not finite (corrupted weights, or fp16 overflow: try fp32)"


def _bad(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value)


def check_base_loss(value: float, batch: int) -> None:
    """The unablated model's loss on one calibration batch must be finite before anything is scored."""
    if _bad(value):
        raise MiOptError(f"the base loss on calibration batch {batch} is {value}: {CAUSE}")


def check_batches(per_batch: dict[str, dict[str, list[float]]]) -> None:
    """Per-batch ablation results {unit: {metric: [value per batch]}}: the first non-finite one is an error."""
    if not per_batch:
        return
    n_batches = max(len(values) for m in per_batch.values() for values in m.values())
    for b in range(n_batches):
        bad = [(unit, metric, values[b]) for unit, m in per_batch.items() for metric, values in m.items()
               if b < len(values) and _bad(values[b])]
        if not bad:
            continue
        if len({unit for unit, _, _ in bad}) == len(per_batch):  # every unit at once: the clean loss itself
            raise MiOptError(f"the base loss on calibration batch {b} is not finite, so no unit can be scored: "
                             f"{CAUSE}")  # engines that record only the mean base loss end up here
        unit, metric, value = bad[0]
        raise MiOptError(f"ablating {unit} on calibration batch {b} gives {metric} {value}: the ablated model's "
                         f"outputs are not finite; profile in fp32, or leave {unit} out of the units")


def check_profile(profile, where: str = "profile") -> None:
    """An ImportanceProfile's base loss and unit scores must be finite numbers (None = not measured)."""
    if _bad(profile.base_loss):
        raise MiOptError(f"{where}: base loss is {profile.base_loss}: {CAUSE}")
    for unit, score in profile.scores.items():
        for metric in ("delta_loss", "kl", "delta_loss_se", "kl_se"):
            value = getattr(score, metric, None)
            if _bad(value):
                raise MiOptError(f"{where}: unit {unit} has {metric} {value}; a plan cannot rank non-finite "
                                 f"scores: re-profile (in fp32) after checking the model with `mi-opt eval`")
