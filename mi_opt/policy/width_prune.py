"""Width pruning: delete the MLP neuron groups (and optionally attention heads) whose removal hurts least.

The budget is parameters to remove: a share of the decoder layers' parameters, a count, or
bytes at the model's dtype. A plan removes at least that much (groups are indivisible), and
the smallest such removal the mode allows:
- uniform: every layer removes the same number of neurons, its least-scored groups of that
  total size, so every MLP keeps one size and plain transformers loads the checkpoint. A
  layer's last group may be smaller than the rest; a per-layer dynamic programme over removed
  neuron counts finds each layer's cheapest set of groups of exactly that size.
- free: groups are taken across all layers in order of score per parameter saved (least damage
  per parameter first) until the budget is met, never emptying an MLP, within `min_keep` and
  outside `protect_layers`. Non-causal scores are put on one scale per layer first (`normalize`).

With `heads`, attention heads compete for the same budget: every head count head_prune.py can
lay out (uniform layouts in uniform mode) is tried with neurons filling the rest, and the
combination of least summed score wins. Summing scores across units assumes their effects add
up, the first-order approximation every one-shot planner here makes; it needs causal neuron
scores (a statistic such as mean |activation| is on no loss scale), so `heads` refuses others.
The plan records which scorer made the scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from mi_opt.errors import MiOptError
from mi_opt.plan import CompressionPlan
from mi_opt.policy.base import PLANNERS, PlanContext, Planner, check_metric
from mi_opt.policy.cost import ModelCost
from mi_opt.policy.head_prune import head_menu
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.units import WIDTH_MODES, parse_unit

BUDGETS = ("fraction", "n_params", "bytes")
# How free mode compares groups of different layers. A causal score (a loss or KL change) is on one
# scale everywhere; a statistic like mean |activation| is not. SmolLM2, activation scores (handbook,
# 8 x 128 tokens), a fifth of the decoder removed, loss on 8 x 128 KJV tokens (base 3.35): raw scores
# compared across layers emptied MLPs to 64 of 1536 neurons, loss 14.0; each layer's scores over
# their mean, 5.47; uniform, 5.29 (random groups, uniform: 6.45). "layer" normalizes, "auto" does so
# for profiles without kl (the non-causal scorers), "none" never. Uniform mode is unaffected.
NORMALIZE = ("auto", "layer", "none")
HOW_TO_PROFILE = ("profile with unit_kinds including 'neurons' (mi-opt profile --units neurons; a recipe's "
                  "profile.options: {unit_kinds: [neurons]})")


def check_budget(config, planner: str) -> None:
    """Exactly one of fraction (in (0, 1)), n_params or bytes (> 0) on `config`."""
    given = [n for n in BUDGETS if getattr(config, n) is not None]
    if len(given) != 1:
        raise MiOptError(f"{planner} needs exactly one budget of {', '.join(BUDGETS)}; got {given or 'none'}")
    if config.fraction is not None and not 0 < config.fraction < 1:
        raise MiOptError(f"fraction (share of the decoder parameters to remove) must be in (0, 1), "
                         f"got {config.fraction}")
    for name in ("n_params", "bytes"):
        if getattr(config, name) is not None and getattr(config, name) <= 0:
            raise MiOptError(f"{name} (to remove) must be > 0, got {getattr(config, name)}")


def removal_target(config, cost: ModelCost) -> int:
    """Parameters the budget asks to remove."""
    if config.fraction is not None:
        return math.ceil(config.fraction * cost.decoder_params)
    if config.n_params is not None:
        return config.n_params
    return math.ceil(config.bytes / cost.bytes_per_param)


def budget_record(config, cost: ModelCost) -> dict:
    return {**{n: getattr(config, n) for n in BUDGETS if getattr(config, n) is not None},
            "remove_params": removal_target(config, cost), "scope": "decoder-layer parameters"}


@dataclass
class WidthPruneConfig:
    fraction: float | None = None       # share of the decoder parameters to remove, or
    n_params: int | None = None         # parameters to remove, or
    bytes: int | None = None            # bytes to remove (at the model's dtype)
    mode: str = "uniform"               # "uniform": one MLP size (plain transformers loads it); "free"
    metric: str = "delta_loss"          # "delta_loss" or "kl"
    min_keep: float = 0.0               # every layer keeps at least this share of its neurons (and >= 1)
    protect_layers: list[int] = field(default_factory=list)  # free mode: layers whose MLP is never pruned
    heads: bool | float = False         # true: heads compete for the budget; a share: at most that share
                                        # of the query heads may go
    normalize: str = "auto"             # free mode across layers: "layer" (scores / layer mean), "none",
                                        # "auto" (layer for non-causal scores, i.e. profiles without kl)

    def __post_init__(self):
        check_budget(self, "width-prune")
        if self.mode not in WIDTH_MODES:
            raise MiOptError(f"mode must be one of {WIDTH_MODES}, got {self.mode!r}")
        check_metric(self.metric)
        if not 0 <= self.min_keep < 1:
            raise MiOptError(f"min_keep (share of each layer's neurons kept) must be in [0, 1), got {self.min_keep}")
        if self.mode == "uniform" and self.protect_layers:
            raise MiOptError("protect_layers needs mode 'free': uniform mode prunes every layer alike")
        self.protect_layers = sorted(int(i) for i in self.protect_layers)
        if self.normalize not in NORMALIZE:
            raise MiOptError(f"normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if not isinstance(self.heads, bool) and not 0 < self.heads < 1:
            raise MiOptError(f"heads must be true, false or a share of the query heads in (0, 1), got {self.heads}")


@dataclass(frozen=True)
class Group:
    layer: int
    neurons: range
    score: float
    params: int  # parameters its deletion saves

    @property
    def ratio(self) -> float:
        return self.score / self.params


def neuron_groups(profile: ImportanceProfile, metric: str, cost: ModelCost, layers: list[int],
                  normalize: str = "none") -> dict[int, list[Group]]:
    """The profile's neuron groups of `layers`, checked: scored, inside the MLP, not overlapping;
    with normalize "layer" (or "auto" on a profile without kl), each layer's scores over their mean."""
    keys = profile.units("neurons")
    if not keys:
        raise MiOptError(f"the profile has no MLP neuron-group scores (L<i>.mlp.N<first>-<last>); {HOW_TO_PROFILE}")
    groups: dict[int, list[Group]] = {}
    for key in keys:
        unit = parse_unit(key)
        if unit.layer not in layers:
            continue
        score = profile.score(key, metric)
        if score is None:
            raise MiOptError(f"{key} has no {metric} score (scorer {profile.method.get('scorer')!r} does not measure "
                             "it); plan with metric: delta_loss")
        if unit.stop > cost.mlp_width[unit.layer]:
            raise MiOptError(f"{key}: layer {unit.layer}'s MLP has neurons 0..{cost.mlp_width[unit.layer] - 1}; "
                             "the profile was measured on another model")
        groups.setdefault(unit.layer, []).append(
            Group(unit.layer, unit.neurons, float(score), len(unit.neurons) * cost.per_neuron[unit.layer]))
    missing = [i for i in layers if i not in groups]
    if missing:
        raise MiOptError(f"the profile has no neuron-group scores for layer(s) {missing}; {HOW_TO_PROFILE}")
    for i, gs in groups.items():
        gs.sort(key=lambda g: g.neurons.start)
        if any(a.neurons.stop > b.neurons.start for a, b in zip(gs, gs[1:])):
            raise MiOptError(f"layer {i}'s neuron groups overlap; profile with one neuron_group size")
    if normalizes(profile, normalize):
        for i, gs in groups.items():
            mean = sum(abs(g.score) for g in gs) / len(gs)
            groups[i] = [Group(g.layer, g.neurons, g.score / mean if mean else 0.0, g.params) for g in gs]
    return groups


def causal(profile: ImportanceProfile) -> bool:
    """Whether the neuron scores are measured damage (they come with a KL), on one scale in every layer."""
    return all(profile.score(k, "kl") is not None for k in profile.units("neurons"))


def normalizes(profile: ImportanceProfile, normalize: str) -> bool:
    return normalize == "layer" or (normalize == "auto" and not causal(profile))


def _cap(width: int, min_keep: float) -> int:
    """Most neurons a layer may lose: never its whole MLP, never below min_keep of it."""
    return width - max(1, math.ceil(min_keep * width))


def layer_removals(groups: list[Group], cap: int) -> dict[int, tuple[float, list[Group]]]:
    """Least summed score of removing exactly n neurons of one layer, for every reachable n <= cap."""
    best: dict[int, tuple[float, list[Group]]] = {0: (0.0, [])}
    for g in groups:
        for n, (s, chosen) in list(best.items()):
            m = n + len(g.neurons)
            if m <= cap and (m not in best or s + g.score < best[m][0]):
                best[m] = (s + g.score, chosen + [g])
    return best


def _prune(chosen: list[Group]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for g in chosen:
        out.setdefault(g.layer, []).extend(g.neurons)
    return {i: sorted(v) for i, v in out.items()}


@dataclass(frozen=True)
class NeuronChoice:
    prune: dict[int, list[int]]
    score: float
    params: int


def uniform_neurons(groups: dict[int, list[Group]], cost: ModelCost, target: int,
                    min_keep: float = 0.0) -> NeuronChoice | None:
    """The fewest neurons per layer, the same in every layer, whose removal saves >= target
    parameters; None when no uniform removal does."""
    widths = {cost.mlp_width[i] for i in groups}
    if len(widths) > 1:
        raise MiOptError(f"uniform width pruning needs one MLP size in every layer, the model has {sorted(widths)}; "
                         "use mode 'free'")
    tables = {i: layer_removals(gs, _cap(next(iter(widths)), min_keep)) for i, gs in groups.items()}
    common = sorted(set.intersection(*(set(t) for t in tables.values())))
    for n in common:
        params = sum(n * cost.per_neuron[i] for i in tables)
        if params >= target:
            chosen = [g for t in tables.values() for g in t[n][1]]
            return NeuronChoice(_prune(chosen), sum(t[n][0] for t in tables.values()), params)
    return None


def free_neurons(groups: dict[int, list[Group]], cost: ModelCost, target: int,
                 min_keep: float = 0.0) -> NeuronChoice | None:
    """Groups in order of score per parameter, across layers, until >= target parameters are saved."""
    room = {i: _cap(cost.mlp_width[i], min_keep) for i in groups}
    chosen, params = [], 0
    for g in sorted((g for gs in groups.values() for g in gs), key=lambda g: (g.ratio, g.layer, g.neurons.start)):
        if params >= target:
            break
        if len(g.neurons) <= room[g.layer]:
            room[g.layer] -= len(g.neurons)
            chosen.append(g)
            params += g.params
    if params < target:
        return None
    return NeuronChoice(_prune(chosen), sum(g.score for g in chosen), params)


def choose_neurons(groups: dict[int, list[Group]], cost: ModelCost, target: int, mode: str,
                   min_keep: float = 0.0) -> NeuronChoice | None:
    if target <= 0:
        return NeuronChoice({}, 0.0, 0)
    pick = uniform_neurons if mode == "uniform" else free_neurons
    return pick(groups, cost, target, min_keep)


def most_removable(groups: dict[int, list[Group]], cost: ModelCost, mode: str, min_keep: float = 0.0) -> int:
    """The most parameters whole groups can save in `mode` (for an error that says what is possible)."""
    tables = {i: layer_removals(gs, _cap(cost.mlp_width[i], min_keep)) for i, gs in groups.items()}
    if mode == "uniform":
        n = max(set.intersection(*(set(t) for t in tables.values())))
        return sum(n * cost.per_neuron[i] for i in tables)
    return sum(max(t) * cost.per_neuron[i] for i, t in tables.items())


def _head_limit(config: WidthPruneConfig, cost: ModelCost, layers: list[int]) -> int:
    total = sum(cost.geometry[i].n_heads for i in layers)
    return total if config.heads is True else math.floor(config.heads * total)


def plan_width_prune(profile: ImportanceProfile, config: WidthPruneConfig, ctx: PlanContext) -> CompressionPlan:
    cost = ctx.cost
    bad = [i for i in config.protect_layers if not 0 <= i < cost.n_layers]
    if bad:
        raise MiOptError(f"protect_layers {bad} are not layers of this {cost.n_layers}-layer model")
    layers = [i for i in range(cost.n_layers) if i not in config.protect_layers]
    if not layers:
        raise MiOptError("every layer is protected: nothing is left to prune")
    groups = neuron_groups(profile, config.metric, cost, layers, config.normalize)
    if config.heads and not causal(profile):
        raise MiOptError(f"heads compete with neuron groups by summed damage, but scorer "
                         f"{profile.method.get('scorer')!r} scored the groups by a statistic, not a loss change "
                         "(no kl): plan heads separately (head-prune), or score the groups causally (ablation)")
    target = removal_target(config, cost)
    menu = {0: (0.0, {})}
    if config.heads:
        menu = head_menu(profile, config.metric, config.mode, ctx, protect_layers=config.protect_layers,
                         limit=_head_limit(config, cost, layers))
    options = []
    for n_heads, (head_score, heads) in sorted(menu.items()):
        head_params = cost.parameters - cost.after([], heads)
        neurons = choose_neurons(groups, cost, target - head_params, config.mode, config.min_keep)
        if neurons is not None:
            options.append((head_score + neurons.score, head_params + neurons.params, n_heads, heads, neurons))
    if not options:
        raise MiOptError(
            f"width-prune cannot remove {target:,} parameters: whole neuron groups of the prunable layers' MLPs "
            f"hold at most {most_removable(groups, cost, config.mode, config.min_keep):,} "
            f"(every layer keeps a neuron and min_keep={config.min_keep} of them"
            f"{'; uniform mode: the same count in every layer' if config.mode == 'uniform' else ''})"
            f"{' even with the heads allowed' if config.heads else ''}. Lower the budget"
            f"{'' if config.heads else ', or let heads compete (heads: true)'}.")
    score, removed, n_heads, heads, neurons = min(options, key=lambda o: (o[0], o[1], o[2]))
    predicted = cost.predicted([], heads, neurons.prune)
    predicted["removed_params"] = removed
    return CompressionPlan(model={}, prune_heads=heads, head_mode=config.mode, prune_neurons=neurons.prune,
                           neuron_mode=config.mode, budget=budget_record(config, cost), predicted=predicted,
                           planner={"scorer": profile.method.get("scorer"), "causal_scores": causal(profile),
                                    "normalized": normalizes(profile, config.normalize), "summed_score": score,
                                    "neurons_removed": sum(len(v) for v in neurons.prune.values()),
                                    "heads_removed": n_heads, "head_options": len(menu)})


PLANNERS.register("width-prune")(Planner(WidthPruneConfig, plan_width_prune,
                                         "delete the least important MLP neuron groups (and heads) under a budget"))
