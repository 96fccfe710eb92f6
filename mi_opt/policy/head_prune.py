"""Head pruning: delete the query heads whose removal hurts least.

Each layer's choices are "keep g heads in each of k KV groups" (best heads, best groups by
the profile's scores), so pruned layers never need duplicated K/V rows:
- uniform: the same (g, k) in every layer, so the config's single head count still holds
  and plain transformers loads the checkpoint;
- free: each layer picks its own (g, k); a dynamic programme finds the per-layer choices
  that remove the requested number of heads at the least summed importance.
A KV group goes whole (with its K/V rows) when none of its query heads is kept. Summing
single-head scores assumes head effects add up, the usual first-order approximation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mi_opt.errors import MiOptError
from mi_opt.plan import CompressionPlan
from mi_opt.policy.base import PLANNERS, PlanContext, Planner, check_metric, rescore_options, unit_scores
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.units import HEAD_MODES, parse_unit



@dataclass
class HeadPruneConfig:
    fraction: float | None = None          # share of the query heads (of the layers considered) to remove, or
    n_heads: int | None = None             # how many query heads to remove in total
    mode: str = "uniform"                  # "uniform" (plain transformers loads it) or "free"
    metric: str = "delta_loss"
    protect_layers: list[int] = field(default_factory=list)  # free mode: layers never pruned
    rounds: int = 1                        # > 1: prune in this many steps, re-scoring the heads left after each
    rescore: str | None = None             # scorer of those rounds; None = the profile's own scorer

    def __post_init__(self):
        if (self.fraction is None) == (self.n_heads is None):
            raise MiOptError("head-prune needs exactly one of fraction, n_heads")
        if self.fraction is not None and not 0 <= self.fraction < 1:
            raise MiOptError(f"fraction must be in [0, 1), got {self.fraction}")
        if self.n_heads is not None and self.n_heads < 0:
            raise MiOptError(f"n_heads must be >= 0, got {self.n_heads}")
        if self.mode not in HEAD_MODES:
            raise MiOptError(f"mode must be one of {HEAD_MODES}, got {self.mode!r}")
        if self.mode == "uniform" and self.protect_layers:
            raise MiOptError("protect_layers needs mode 'free': uniform mode prunes every layer alike")
        check_metric(self.metric)
        self.protect_layers = sorted(int(i) for i in self.protect_layers)
        if self.rounds < 1:
            raise MiOptError(f"rounds must be >= 1, got {self.rounds}")
        if self.rescore is not None:
            from mi_opt.profile.scorers import SCORERS

            SCORERS.get(self.rescore)  # an unknown name fails now, with suggestions


@dataclass(frozen=True)
class _Option:
    keep_per_group: int
    keep_groups: int
    pruned: tuple[int, ...]
    removed_score: float


def _layer_options(scores: list[float], n_kv: int,
                   group_scores: list[float] | None = None) -> dict[tuple[int, int], _Option]:
    """Best heads to remove for every (heads kept per group, groups kept) of one layer.

    A removed whole KV group costs its own measured score when the profile has one (L<i>.KV<g>
    units): ablating a group together captures interactions that the sum of its heads' single
    ablations misses. Otherwise it costs the sum of its heads' scores.
    """
    group = len(scores) // n_kv

    def group_cost(kv: int) -> float:
        if group_scores is not None:
            return group_scores[kv]
        return sum(scores[kv * group:(kv + 1) * group])

    options = {}
    for g in range(1, group + 1):
        kept_by_group = []
        for kv in range(n_kv):
            heads = sorted(range(kv * group, (kv + 1) * group), key=lambda h: (-scores[h], h))[:g]
            # Keeping a group is worth what removing it whole would cost, less its pruned heads.
            pruned_inside = sum(scores[h] for h in range(kv * group, (kv + 1) * group) if h not in heads)
            kept_by_group.append((group_cost(kv) - pruned_inside, kv, heads))
        kept_by_group.sort(key=lambda t: (-t[0], t[1]))
        for k in range(1, n_kv + 1):
            keep = {h for _, _, heads in kept_by_group[:k] for h in heads}
            pruned = tuple(h for h in range(len(scores)) if h not in keep)
            removed = sum(group_cost(kv) for _, kv, _ in kept_by_group[k:])
            removed += sum(scores[h] for _, kv, heads in kept_by_group[:k]
                           for h in range(kv * group, (kv + 1) * group) if h not in heads)
            options[(g, k)] = _Option(g, k, pruned, removed)
    return options


def _uniform(options: dict[int, dict], n_heads: int, n_remove: int) -> tuple[dict[int, tuple[int, ...]], float]:
    """The same layout in every layer removing `n_remove` heads in all, and its summed score."""
    layers = list(options)
    if n_remove % len(layers):
        raise MiOptError(f"uniform head pruning removes the same number of heads from each of the {len(layers)} "
                         f"layers; {n_remove} heads is not a multiple of {len(layers)}")
    target = n_heads - n_remove // len(layers)
    shapes = [s for s in options[layers[0]] if s[0] * s[1] == target]
    if not shapes:
        possible = sorted({n_heads - g * k for g, k in options[layers[0]]})
        raise MiOptError(f"uniform head pruning cannot leave {target} heads per layer with this grouped-query "
                         f"layout; heads removable per layer: {possible}. Pick another fraction or mode 'free'.")
    best = min(shapes, key=lambda s: (sum(options[i][s].removed_score for i in layers), s))
    return {i: options[i][best].pruned for i in layers}, sum(options[i][best].removed_score for i in layers)


def _free_table(options: dict[int, dict], n_heads_of: dict[int, int],
                limit: int) -> dict[int, tuple[float, list]]:
    """Least summed score, and its per-layer choices, of every head count up to `limit` that
    whole, evenly filled KV groups can reach."""
    # dp[r] = (least summed score, choices) over the layers seen so far, removing exactly r heads.
    dp: dict[int, tuple[float, list]] = {0: (0.0, [])}
    for i, opts in options.items():
        menu = [(0, 0.0, ())] + [(n_heads_of[i] - g * k, o.removed_score, o.pruned)
                                 for (g, k), o in opts.items() if g * k < n_heads_of[i]]
        nxt: dict[int, tuple[float, list]] = {}
        for r, (score, choice) in dp.items():
            for removed, s, pruned in menu:
                if r + removed > limit:
                    continue
                cand = (score + s, choice + [(i, pruned)])
                if r + removed not in nxt or cand[0] < nxt[r + removed][0]:
                    nxt[r + removed] = cand
        dp = nxt
    return dp


def _free(options: dict[int, dict], n_heads_of: dict[int, int], n_remove: int) -> dict[int, tuple[int, ...]]:
    dp = _free_table(options, n_heads_of, n_remove)
    if n_remove not in dp:
        raise MiOptError(f"free head pruning cannot remove exactly {n_remove} heads while keeping whole, "
                         f"evenly filled KV groups; reachable counts near it: "
                         f"{sorted(dp, key=lambda r: abs(r - n_remove))[:5]}")
    return {i: pruned for i, pruned in dp[n_remove][1] if pruned}


def _group_scores(profile: ImportanceProfile, metric: str) -> dict[int, list[float]]:
    """Measured KV-group scores per layer, where the profile has L<i>.KV<g> units."""
    by_layer: dict[int, dict[int, float]] = {}
    for key in profile.units("kv_group"):
        unit = parse_unit(key)
        by_layer.setdefault(unit.layer, {})[unit.index] = profile.score(key, metric)
    return {i: [g[k] for k in sorted(g)] for i, g in by_layer.items()}


def _layer_menus(profile: ImportanceProfile, metric: str, ctx: PlanContext,
                 layers: list[int]) -> dict[int, dict[tuple[int, int], _Option]]:
    """Every layer's head-removal options, from the profile's head (and KV-group) scores."""
    by_layer: dict[int, dict[int, float]] = {}
    for key, s in unit_scores(profile, "head", metric).items():
        unit = parse_unit(key)
        by_layer.setdefault(unit.layer, {})[unit.index] = s
    missing = [i for i in layers if len(by_layer.get(i, {})) != ctx.cost.geometry[i].n_heads]
    if missing:
        raise MiOptError(f"the profile lacks head scores for layer(s) {missing}; profile every head first")
    if not layers:
        raise MiOptError("no layer is left to prune heads from (all dropped or protected)")
    groups = _group_scores(profile, metric)
    return {i: _layer_options([by_layer[i][h] for h in range(ctx.cost.geometry[i].n_heads)],
                              ctx.cost.geometry[i].n_kv_heads,
                              groups.get(i) if len(groups.get(i, [])) == ctx.cost.geometry[i].n_kv_heads else None)
            for i in layers}


def choose_heads(profile: ImportanceProfile, config: HeadPruneConfig, ctx: PlanContext,
                 skip_layers: list[int] = ()) -> dict[int, list[int]]:
    """Query heads to delete per layer (original numbering), leaving `skip_layers` out."""
    layers = [i for i in range(ctx.cost.n_layers) if i not in skip_layers and i not in config.protect_layers]
    options = _layer_menus(profile, config.metric, ctx, layers)
    n_heads_of = {i: ctx.cost.geometry[i].n_heads for i in layers}
    total = sum(n_heads_of.values())
    n_remove = round(config.fraction * total) if config.fraction is not None else config.n_heads
    if n_remove > total - len(layers):
        raise MiOptError(f"cannot remove {n_remove} of {total} heads: every layer keeps at least one head")
    if n_remove == 0:
        return {}
    if config.mode == "uniform":
        if len(set(n_heads_of.values())) > 1:
            raise MiOptError("uniform head pruning needs the same head count in every layer; use mode 'free'")
        chosen, _ = _uniform(options, next(iter(n_heads_of.values())), n_remove)
    else:
        chosen = _free(options, n_heads_of, n_remove)
    return {i: sorted(p) for i, p in chosen.items() if p}


def head_menu(profile: ImportanceProfile, metric: str, mode: str, ctx: PlanContext, skip_layers: list[int] = (),
              protect_layers: list[int] = (), limit: int | None = None) -> dict[int, tuple[float, dict[int, list[int]]]]:
    """Every total number of query heads `mode` can remove (up to `limit`), with the least summed
    score that removes it and the heads that do (original numbering): what a planner weighing
    heads against other units chooses from. Uniform: multiples of the layer count whose per-layer
    layout exists; free: the counts whole, evenly filled KV groups reach."""
    layers = [i for i in range(ctx.cost.n_layers) if i not in skip_layers and i not in protect_layers]
    options = _layer_menus(profile, metric, ctx, layers)
    n_heads_of = {i: ctx.cost.geometry[i].n_heads for i in layers}
    limit = sum(n_heads_of.values()) if limit is None else limit
    menu: dict[int, tuple[float, dict[int, list[int]]]] = {}
    if mode == "uniform":
        if len(set(n_heads_of.values())) > 1:
            raise MiOptError("uniform head pruning needs the same head count in every layer; use mode 'free'")
        n_heads = next(iter(n_heads_of.values()))
        for per_layer in sorted({n_heads - g * k for g, k in options[layers[0]]}):
            if per_layer * len(layers) <= limit:
                chosen, score = _uniform(options, n_heads, per_layer * len(layers)) if per_layer else ({}, 0.0)
                menu[per_layer * len(layers)] = (score, {i: sorted(p) for i, p in chosen.items() if p})
        return menu
    for r, (score, choice) in _free_table(options, n_heads_of, limit).items():
        menu[r] = (score, {i: sorted(p) for i, p in choice if p})
    return menu


def plan_head_prune(profile: ImportanceProfile, config: HeadPruneConfig, ctx: PlanContext) -> CompressionPlan:
    if config.rounds > 1:
        prune, rounds = prune_in_rounds(profile, config, ctx)
    else:
        prune, rounds = choose_heads(profile, config, ctx), []
    budget = {"fraction": config.fraction} if config.fraction is not None else {"n_heads": config.n_heads}
    return CompressionPlan(model={}, prune_heads=prune, head_mode=config.mode, budget=budget,
                           predicted=ctx.cost.predicted([], prune), planner={"rounds": rounds} if rounds else {})


def prune_in_rounds(profile: ImportanceProfile, config: HeadPruneConfig,
                    ctx: PlanContext) -> tuple[dict[int, list[int]], list[dict]]:
    """Prune toward the budget in `config.rounds` steps; after each step the heads left are
    re-scored in the pruned model, where their roles may have changed. Every round plans on the
    original model's heads: pruned heads score -1e9 (removed again first), the rest their
    latest score, so the final plan applies to the original model like any other."""
    import copy
    import dataclasses

    from mi_opt.profile.importance import UnitScore
    from mi_opt.profile.scorers import run_scorer
    from mi_opt.surgery.heads import prune_heads_

    if ctx.windows is None:
        raise MiOptError("head pruning in rounds re-scores the pruned model and needs calibration windows: pass "
                         "windows= to make_plan (the CLI rebuilds them from the profile's calibration)")
    scorer = config.rescore or profile.method.get("scorer", "ablation")
    options = rescore_options(profile, scorer)
    total = choose_heads(profile, dataclasses.replace(config, rounds=1), ctx)
    n_total = sum(len(v) for v in total.values())
    current, prune, rounds = profile, {}, []
    for r in range(1, config.rounds + 1):
        step = dataclasses.replace(config, fraction=None, n_heads=round(n_total * r / config.rounds), rounds=1,
                                   mode=config.mode if r == config.rounds else "free")
        prune = choose_heads(current, step, ctx)
        rounds.append({"n_heads": step.n_heads, "pruned": {str(k): v for k, v in prune.items()}})
        if r == config.rounds:
            break
        work = copy.deepcopy(ctx.model)
        layouts = prune_heads_(work, prune, mode="free")
        fresh = run_scorer(scorer, work, ctx.windows, {"unit_kinds": ("head",), **options}, progress=ctx.progress)
        rounds[-1]["cost"] = fresh.cost
        scores = {key: UnitScore(-1e9, None, -1e9, None) for key in profile.units("head")}
        for key in fresh.units("head"):
            unit = parse_unit(key)
            original = layouts[unit.layer].keep_heads[unit.index] if unit.layer in layouts else unit.index
            scores[f"L{unit.layer}.H{original}"] = fresh.scores[key]
        current = dataclasses.replace(profile, scores=scores)
    return prune, rounds


PLANNERS.register("head-prune")(Planner(HeadPruneConfig, plan_head_prune,
                                        "delete the least important attention heads"))
