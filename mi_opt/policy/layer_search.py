"""Searching for the set of layers to drop, re-measuring as the model shrinks.

One-shot scores each layer in the full model. Once a layer is gone its neighbours' roles
change, so the searches here re-score the layers that remain on the calibration windows:

- greedy (`iterative`): drop the least important layer(s), re-score, repeat. The re-scorer
  is any registered scorer that scores layers (exact ablation by default). With
  `candidates = m`, each round re-measures only the m remaining layers the starting profile
  ranks lowest and picks among those: a cheap scorer (block influence, attribution) ranks,
  and the expensive exact one runs on the decision boundary only.
- beam (`beam_width > 1`): keep the best `beam_width` drop sets at each depth, ranked by
  the calibration loss of the model without them. Exact ablation of layer l in the model
  without S gives loss(S + l) = loss(S) + delta_loss(l), so one ablation profile per beam
  state scores every extension.

Every round is recorded with its cumulative work (forward-pass equivalents and wall time),
so a benchmark can read the cost of each smaller budget off one deeper search.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.profile.cost import measured_forward_equivalents
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.units import Unit, parse_unit


@dataclass
class _Work:
    """Cumulative cost of the re-scoring done so far."""

    forward_equivalents: float = 0.0
    wall_s: float = 0.0

    def add(self, profile: ImportanceProfile, started: float) -> None:
        self.forward_equivalents += measured_forward_equivalents(profile.cost)
        self.wall_s += time.perf_counter() - started


def _without(model, alive: list[int], drop: list[int]):
    from mi_opt.surgery.layers import drop_layers_

    return drop_layers_(model, [alive.index(i) for i in drop])


def rescore(model, alive: list[int], only: list[int] | None, windows: torch.Tensor, scorer: str, options: dict,
            metric: str, work: _Work) -> tuple[dict[int, float], float | None]:
    """Scores of the layers of `model` (whose layer j is original layer alive[j]) in original
    numbering, and the model's calibration loss where the scorer measures it."""
    from mi_opt.profile.scorers import run_scorer

    started = time.perf_counter()
    units = None if only is None else [Unit(alive.index(i), "layer").key for i in only]
    profile = run_scorer(scorer, model, windows, {"unit_kinds": ("layer",), **options}, progress=False, units=units)
    work.add(profile, started)
    scores = {alive[parse_unit(k).layer]: profile.score(k, metric) for k in profile.units("layer")}
    if only is not None:
        scores = {i: s for i, s in scores.items() if i in only}
    return scores, profile.base_loss


def greedy(scores: dict[int, float], pool: list[int], choose: Callable[[dict[int, float], list[int]], list[int]],
           done: Callable[[list[int]], bool], model, windows: torch.Tensor, scorer: str, options: dict,
           metric: str, candidates: int | None, progress: bool) -> tuple[list[int], list[dict]]:
    """Drop the layers `choose(scores, dropped)` returns (original numbering, from `pool`) until
    `done(dropped)`, re-scoring what remains after each round. `model` is copied, never modified."""
    work, work_model = _Work(), copy.deepcopy(model)
    alive = list(range(get_adapter(model).n_layers()))
    # Candidates are ranked by the starting profile: its scorer may be a cheap one on another
    # scale than the re-scorer's, so fresh and starting scores are never compared.
    starting = dict(scores)
    dropped: list[int] = []
    rounds: list[dict] = []
    bar = tqdm(desc="iterative layer search", unit="round", disable=not progress)
    while not done(dropped):
        new = choose(scores, dropped)[len(dropped):]
        if not new:
            break
        dropped += new
        rounds.append({"dropped": new, "scores": {f"L{i}": round(s, 6) for i, s in scores.items()},
                       "forward_equivalents": round(work.forward_equivalents, 3), "wall_s": round(work.wall_s, 2)})
        bar.update(1)
        if done(dropped):
            break
        _without(work_model, alive, new)
        alive = [i for i in alive if i not in new]
        remaining = sorted((i for i in pool if i not in dropped), key=lambda i: (starting.get(i, float("inf")), i))
        only = remaining[:candidates] if candidates else remaining
        scores, _ = rescore(work_model, alive, only, windows, scorer, options, metric, work)
    bar.close()
    return dropped, rounds


def beam(pool: list[int], depth: int, width: int, model, windows: torch.Tensor, options: dict,
         candidates: int | None, progress: bool) -> tuple[list[int], list[dict]]:
    """Best set of `depth` layers from `pool` by calibration loss, by beam search of `width`."""
    work = _Work()
    states: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
    starting: dict[int, float] = {}  # depth 1's scores of every layer: they rank the candidates later
    rounds: list[dict] = []
    n_layers = get_adapter(model).n_layers()
    with tqdm(total=depth * width, desc=f"beam search (width {width})", unit="state", disable=not progress) as bar:
        for d in range(1, depth + 1):
            expansions: dict[tuple[int, ...], float] = {}
            for _, dropped in states:
                alive = [i for i in range(n_layers) if i not in dropped]
                remaining = sorted((i for i in pool if i not in dropped), key=lambda i: (starting.get(i, 0.0), i))
                only = remaining[:candidates] if candidates and starting else remaining
                shrunk = _without(copy.deepcopy(model), list(range(n_layers)), list(dropped))
                scores, base_loss = rescore(shrunk, alive, only, windows, "ablation", options, "delta_loss", work)
                if not starting:
                    starting = dict(scores)
                for i, s in scores.items():
                    key = tuple(sorted(dropped + (i,)))
                    expansions[key] = min(expansions.get(key, float("inf")), base_loss + s)
                bar.update(1)
            best = sorted(expansions, key=lambda k: (expansions[k], k))[:width]
            if not best:
                raise MiOptError(f"beam search ran out of candidate layers at depth {d}")
            states = [(expansions[k], k) for k in best]
            rounds.append({"depth": d, "best": list(states[0][1]), "calibration_loss": round(states[0][0], 6),
                           "beam": [{"drop": list(k), "calibration_loss": round(expansions[k], 6)} for k in best],
                           "forward_equivalents": round(work.forward_equivalents, 3), "wall_s": round(work.wall_s, 2)})
    return list(states[0][1]), rounds
