"""Hand-built importance profiles of the tiny Llama: planners only read scores, so seeded numbers test them exactly.

MLP width 64 in groups of 24: 0-23, 24-47 and a smaller last group 48-63.
"""
from __future__ import annotations

import random

from mi_opt.profile.importance import ImportanceProfile, UnitScore
from mi_opt.units import neuron_groups

GROUP = 24


def hand_profile(seed: int = 0, heads: float | None = None, neurons: bool = True, kl: bool = True,
                 layers: bool = False) -> ImportanceProfile:
    """Seeded scores for every neuron group (and head, and layer); `heads` fixes every head's score."""
    rng = random.Random(seed)
    scores = {}
    for i in range(4):
        if neurons:
            for u in neuron_groups(i, 64, GROUP):
                scores[u.key] = UnitScore(rng.uniform(0.1, 1), 0, rng.uniform(0.1, 1) if kl else None, 0)
        for h in range(4):
            s = heads if heads is not None else rng.uniform(0.1, 1)
            scores[f"L{i}.H{h}"] = UnitScore(s, 0, s, 0)
        if layers:
            scores[f"L{i}"] = UnitScore(rng.uniform(1, 2), 0, rng.uniform(1, 2), 0)
    return ImportanceProfile(model={}, method={"scorer": "activation"}, calibration={}, base_loss=None,
                             scores=scores)
