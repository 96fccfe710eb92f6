"""Joint pruning: one parameter budget split across depth, heads and MLP width, the split chosen by measurement.

Which mix of layer drops, head pruning and neuron pruning hurts least depends on the model, and
summed one-shot scores of different unit kinds do not compare reliably (a layer's score is not
the sum of its heads' and neurons'). So, as Minitron searches over depth/width mixes, this
planner tries a grid of splits of the budget (shares in steps of `step`, pure ones included),
builds each split's plan with the single planners' choosers (least-scored layers, head_prune's
layouts, width_prune's neuron groups), applies every distinct candidate to a copy of the model
and measures its mean next-token loss and KL to the unpruned model on the calibration windows,
and keeps the least damaging. Every candidate and its measurement goes into the plan.

Each part spends its share cumulatively: depth removes >= d*T, heads then bring the total to
>= (d+h)*T, neurons to >= T, so a part that overshoots (a layer is coarse) leaves less to the next.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mi_opt.errors import MiOptError
from mi_opt.plan import CompressionPlan
from mi_opt.policy.base import PLANNERS, PlanContext, Planner, check_metric, unit_scores
from mi_opt.policy.head_prune import head_menu
from mi_opt.policy.layer_skip import LayerSkipConfig, choose_layers
from mi_opt.policy.width_prune import (budget_record, check_budget, choose_neurons, neuron_groups,
                                       removal_target)
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.units import WIDTH_MODES, parse_unit

PARTS = ("layers", "heads", "neurons")
_KIND = {"layers": "layer", "heads": "head", "neurons": "neurons"}  # the profile unit kind each part reads
SELECT = ("kl", "loss")


@dataclass
class JointPruneConfig:
    fraction: float | None = None      # share of the decoder parameters to remove, or
    n_params: int | None = None        # parameters to remove, or
    bytes: int | None = None           # bytes to remove (at the model's dtype)
    parts: list[str] | None = None     # which of layers, heads, neurons may share the budget; None: those the
                                       # profile scores
    step: float = 0.25                 # grid of budget shares (1/step must be a whole number)
    mode: str = "uniform"              # heads and neurons: "uniform" (plain transformers loads it) or "free"
    metric: str = "delta_loss"         # the scores each part ranks its units by
    select: str = "kl"                 # measured damage that picks the mix: "kl" (to the unpruned model) or "loss"
    protect_first: int = 1             # layers: never drop the first n
    protect_last: int = 1              # ... nor the last n
    min_keep: float = 0.0              # neurons: each layer keeps at least this share of its MLP
    batch_size: int = 4                # calibration windows per forward when measuring candidates

    def __post_init__(self):
        check_budget(self, "joint-prune")
        if self.parts is not None:
            self.parts = [str(p) for p in self.parts]
            unknown = [p for p in self.parts if p not in PARTS]
            if unknown or not self.parts or len(set(self.parts)) != len(self.parts):
                raise MiOptError(f"parts must be distinct names from {PARTS}, got {self.parts}")
        steps = 1 / self.step if self.step > 0 else 0
        if not 0 < self.step <= 1 or abs(steps - round(steps)) > 1e-9:
            raise MiOptError(f"step must be 1/k for a whole k >= 1 (0.25, 0.5, 1/3), got {self.step}")
        if self.mode not in WIDTH_MODES:
            raise MiOptError(f"mode must be one of {WIDTH_MODES}, got {self.mode!r}")
        check_metric(self.metric)
        if self.select not in SELECT:
            raise MiOptError(f"select must be one of {SELECT}, got {self.select!r}")
        if self.protect_first < 0 or self.protect_last < 0:
            raise MiOptError("protect_first and protect_last must be >= 0")
        if not 0 <= self.min_keep < 1:
            raise MiOptError(f"min_keep must be in [0, 1), got {self.min_keep}")
        if self.batch_size < 1:
            raise MiOptError(f"batch_size must be >= 1, got {self.batch_size}")


def mixes(parts: list[str], step: float) -> list[dict[str, float]]:
    """Every split of the budget over `parts` in multiples of `step` (the pure ones included)."""
    k = round(1 / step)
    out = []

    def fill(i: int, left: int, acc: list[int]) -> None:
        if i == len(parts) - 1:
            out.append(dict(zip(parts, [a / k for a in acc + [left]])))
            return
        for n in range(left, -1, -1):
            fill(i + 1, left - n, acc + [n])

    fill(0, k, [])
    return out


@dataclass
class Candidate:
    mix: dict[str, float]
    plan: CompressionPlan | None = None
    why_not: str | None = None           # the split cannot be built (a part cannot save its share)
    measured: dict = field(default_factory=dict)

    def record(self) -> dict:
        out = {"mix": self.mix}
        if self.plan is None:
            return {**out, "skipped": self.why_not}
        p = self.plan
        return {**out, "drop_layers": p.drop_layers, "heads_removed": sum(len(v) for v in p.prune_heads.values()),
                "neurons_removed": sum(len(v) for v in p.prune_neurons.values()),
                "parameters": p.predicted["parameters"], **self.measured}


def layer_metric(profile: ImportanceProfile, metric: str) -> str:
    """The metric layers rank by: `metric`, unless their scorer measured none (block influence
    has one score, kept as delta_loss; the candidates are measured anyway, so only the order matters)."""
    layers = profile.units("layer")
    if layers and all(profile.score(k, metric) is None for k in layers):
        return "delta_loss"
    return metric


def _build(profile: ImportanceProfile, config: JointPruneConfig, ctx: PlanContext, mix: dict[str, float],
           target: int) -> Candidate:
    cost = ctx.cost
    cand = Candidate(mix)
    drop: list[int] = []
    heads: dict[int, list[int]] = {}
    neurons: dict[int, list[int]] = {}
    share = 0.0

    def saved() -> int:
        return cost.parameters - cost.after(drop, heads, neurons)

    if mix.get("layers"):
        share += mix["layers"]
        want = math.ceil(share * target)
        metric = layer_metric(profile, config.metric)
        skip = LayerSkipConfig(target_params=max(1, cost.parameters - want), metric=metric,
                               protect_first=config.protect_first, protect_last=config.protect_last)
        scores = {parse_unit(k).layer: s for k, s in unit_scores(profile, "layer", metric).items()}
        drop = sorted(choose_layers(scores, skip, ctx))
        if saved() < want:
            cand.why_not = f"dropping every unprotected layer saves {saved():,} of the {want:,} parameters asked"
            return cand
    if mix.get("heads"):
        share += mix["heads"]
        want = math.ceil(share * target) - saved()
        if want > 0:
            menu = head_menu(profile, config.metric, config.mode, ctx, skip_layers=drop)
            enough = [(r, h) for r, (_, h) in sorted(menu.items()) if cost.after(drop, {}) - cost.after(drop, h) >= want]
            if not enough:
                cand.why_not = f"no {config.mode} head layout of the kept layers saves {want:,} parameters"
                return cand
            heads = enough[0][1]
    if mix.get("neurons"):
        want = target - saved()
        kept = [i for i in range(cost.n_layers) if i not in drop]
        choice = choose_neurons(neuron_groups(profile, config.metric, cost, kept, "auto"), cost, want, config.mode,
                                config.min_keep)
        if choice is None:
            cand.why_not = f"no {config.mode} neuron pruning of the kept layers saves the remaining {want:,} parameters"
            return cand
        neurons = choice.prune
    cand.plan = CompressionPlan(model={}, drop_layers=drop, prune_heads=heads, head_mode=config.mode,
                                prune_neurons=neurons, neuron_mode=config.mode,
                                predicted=cost.predicted(drop, heads, neurons))
    return cand


@torch.inference_mode()
def _token_stats(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities (batch x tokens-1 x vocab) and the targets."""
    logits = model(ids, use_cache=False).logits[:, :-1].float()
    return F.log_softmax(logits, dim=-1), ids[:, 1:].to(logits.device)


def measure(models, ctx: PlanContext, batch_size: int, desc: str) -> list[dict]:
    """Mean next-token loss and KL(unpruned || candidate) of each model `models` yields, on ctx.windows.

    The unpruned model's log-probabilities are computed once and kept (windows x tokens x vocab
    floats: the planner's windows are few), so every candidate costs one pass over the windows.
    """
    from mi_opt.profile.engine import calibration_batches

    device = next(ctx.model.parameters()).device
    batches = calibration_batches(ctx.windows, batch_size, device)
    reference = [_token_stats(ctx.model, ids) for ids in batches]
    base = sum(F.nll_loss(lp.transpose(1, 2), t, reduction="sum").item() for lp, t in reference)
    n_tokens = sum(t.numel() for _, t in reference)
    results = []
    with tqdm(desc=desc, unit="candidate", disable=not ctx.progress) as bar:
        for model in models:
            loss = kl = 0.0
            for ids, (ref, targets) in zip(batches, reference):
                logp, _ = _token_stats(model, ids)
                loss += F.nll_loss(logp.transpose(1, 2), targets, reduction="sum").item()
                kl += (ref.exp() * (ref - logp)).sum().item()
            results.append({"loss": round(loss / n_tokens, 6), "delta_loss": round((loss - base) / n_tokens, 6),
                            "kl": round(kl / n_tokens, 6)})
            bar.update(1)
    return results


def _pruned_copies(ctx: PlanContext, plans: list[CompressionPlan]):
    from mi_opt.surgery import apply_

    for plan in plans:
        yield apply_(copy.deepcopy(ctx.model), plan)  # one copy alive at a time


def _parts(profile: ImportanceProfile, config: JointPruneConfig) -> list[str]:
    have = [p for p in PARTS if profile.units(_KIND[p])]
    if config.parts is None:
        if not have:
            raise MiOptError("the profile scores no layers, heads or MLP neuron groups; profile with unit_kinds "
                             "such as [layer, head, neurons]")
        return have
    missing = [p for p in config.parts if p not in have]
    if missing:
        raise MiOptError(f"parts {missing} need {[_KIND[p] for p in missing]} scores, which the profile lacks; "
                         "profile with those unit_kinds (neurons: --units neurons) or leave them out of parts")
    return config.parts


def plan_joint_prune(profile: ImportanceProfile, config: JointPruneConfig, ctx: PlanContext) -> CompressionPlan:
    if ctx.windows is None:
        raise MiOptError("joint-prune measures every candidate mix on calibration windows and got none: pass "
                         "windows= to make_plan (mi-opt plan rebuilds them from the profile's calibration; "
                         "mi-opt run passes the recipe's)")
    target = removal_target(config, ctx.cost)
    candidates = [_build(profile, config, ctx, mix, target) for mix in mixes(_parts(profile, config), config.step)]
    # Mixes that round to the same plan (a coarse part overshooting) are measured once.
    distinct: dict[tuple, list[Candidate]] = {}
    for c in candidates:
        if c.plan is not None:
            key = (tuple(c.plan.drop_layers), tuple(sorted((k, tuple(v)) for k, v in c.plan.prune_heads.items())),
                   tuple(sorted((k, tuple(v)) for k, v in c.plan.prune_neurons.items())))
            distinct.setdefault(key, []).append(c)
    if not distinct:
        reasons = "; ".join(f"{c.mix}: {c.why_not}" for c in candidates)
        raise MiOptError(f"joint-prune cannot build any mix that removes {target:,} parameters ({reasons}); "
                         "lower the budget")
    groups = list(distinct.values())
    results = measure(_pruned_copies(ctx, [g[0].plan for g in groups]), ctx, config.batch_size,
                      f"joint-prune: measuring {len(groups)} candidate mixes")
    for group, result in zip(groups, results):
        for c in group:
            c.measured = result
    key = "kl" if config.select == "kl" else "loss"
    best = min((g[0] for g in groups), key=lambda c: (c.measured[key], c.plan.predicted["parameters"]))
    plan = best.plan
    plan.budget = budget_record(config, ctx.cost)
    plan.predicted["removed_params"] = ctx.cost.parameters - plan.predicted["parameters"]
    plan.planner = {"chosen_mix": best.mix, "select": config.select, "parts": _parts(profile, config),
                    "candidates": [{**c.record(), "chosen": c is best} for c in candidates]}
    return plan


PLANNERS.register("joint-prune")(Planner(JointPruneConfig, plan_joint_prune,
                                         "split a parameter budget across layers, heads and MLP width by measured damage"))
