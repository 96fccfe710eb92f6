"""Bit widths per layer (or per module) under a budget, allocated by measured quantization damage.

Scores: by default each unit's own quantization damage at each width (quant_sensitivity.py),
measured on the calibration windows or read from a saved "mi-opt/quant-sensitivity" file. The
`score="importance"` mode allocates from the profile's layer-ablation scores instead; it exists
as a baseline: on SmolLM2 it did worse than random layer halves (1.21x their perplexity
increase and fewer generative items right, reports/bits.md): layer importance is not
quantization sensitivity.

Granularity: per module by default. A layer's quantization damage is mostly one or two of its
linears (on SmolLM2: down_proj in layers 11 and 29, v_proj everywhere), so one width per layer
pays 8 bits for modules that do not need them. Measured at equal bytes (benchmarks/bits.py,
calibrated on handbook prose, judged on KJV and every task item, paired): per-module allocation
had 0.44x the perplexity increase of random layer halves ({4, 8, 16}; 0.48x with {4, 8}, a tie on
perplexity and slightly more generative items right), per-layer 0.88x. The price is 7
calibration runs per layer instead of 1 (about 17 min against 2.5 for 8 x 256 tokens on 2 cores).

Allocation: a multiple-choice knapsack (one width per unit, summed damage minimized, summed cost
within the budget), solved by dynamic programming over cost buckets. Costs are counted in their
greatest common unit when that fits `resolution` buckets (then the answer is exactly optimal),
else rounded *up* to buckets (never over budget, optimal up to one bucket per unit).

Rules, explicit: the budget covers the decoder layers' linears. Token embeddings stay 16-bit
(bitsandbytes has no inference kernel mi-opt can reload); lm_head takes `lm_head_bits`, which must
stay 16 when it is tied to the embeddings (SmolLM2): `untie_lm_head_` first otherwise.

Backend: `backend` names the quantization backend (mi_opt/quant/) the plan is for; the widths must
be ones it offers, the damage is measured with its own quantizer, and a saved sensitivity measured
with another backend is refused: one backend's damage says little about another's (LLM.int8 rounds
activations, torchao int8 weight-only and GGUF only weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.plan import INT8_THRESHOLD, CompressionPlan, check_int8_threshold
from mi_opt.policy.base import PLANNERS, PlanContext, Planner, check_metric, unit_scores
from mi_opt.profile.quant_sensitivity import (GRANULARITIES, QuantSensitivity, measure_quant_sensitivity, quant_units,
                                              unit_sizes)
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.units import BIT_WIDTHS, PLANNER_WIDTHS, layer_of, parse_unit

SCORES = ("sensitivity", "importance")
# importance mode: damage of a unit at width w = importance * 4^-(w-4), the scaling of the
# quantization noise power with bits (each extra bit halves the step, quarters the power).
_NOISE = {4: 1.0, 5: 4.0 ** -1, 8: 4.0 ** -4, 16: 0.0}


@dataclass
class BitsConfig:
    widths: tuple[int, ...] = PLANNER_WIDTHS  # candidate widths per unit (subset of BIT_WIDTHS the backend offers)
    avg_bits: float | None = None          # budget: mean bits per weight over the decoder linears, or
    max_bytes: int | None = None           # ... their total bytes (4/8-bit scales included; 16 = bf16)
    granularity: str | None = None         # "module": a width per linear; "layer": one per layer.
                                           # None: module (sensitivity), layer (importance scores)
    metric: str = "kl"                     # damage to minimize: "kl" or "delta_loss"
    quant_type: str | None = None          # 4-bit format; None: the backend's default (bitsandbytes nf4, gguf Q4_0)
    backend: str = "bitsandbytes"          # quantization backend (mi_opt/quant/): bitsandbytes, torchao, gguf
    int8_threshold: float = INT8_THRESHOLD # LLM.int8 outlier threshold for the 8-bit modules (0 = pure int8)
    score: str = "sensitivity"             # "sensitivity" (measured quantization damage) or "importance"
    sensitivity: str | None = None         # saved quant-sensitivity JSON; measured when None
    batch_size: int = 4                    # calibration windows per forward when measuring
    lm_head_bits: int = 16                 # lm_head width, outside the budget; 16 when tied
    resolution: int = 20000                # most DP cost buckets

    def __post_init__(self):
        self.widths = tuple(sorted(set(int(w) for w in self.widths)))
        if not self.widths or any(w not in BIT_WIDTHS for w in self.widths):
            raise MiOptError(f"widths must be a non-empty subset of {BIT_WIDTHS}, got {self.widths}")
        if (self.avg_bits is None) == (self.max_bytes is None):
            raise MiOptError("bits planner needs exactly one budget: avg_bits or max_bytes")
        if self.avg_bits is not None and not 0 < self.avg_bits <= 16:
            raise MiOptError(f"avg_bits must be in (0, 16], got {self.avg_bits}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise MiOptError(f"max_bytes must be > 0, got {self.max_bytes}")
        if self.score not in SCORES:
            raise MiOptError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.granularity is None:
            self.granularity = "layer" if self.score == "importance" else "module"
        if self.granularity not in GRANULARITIES:
            raise MiOptError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        check_metric(self.metric)
        from mi_opt.quant import get_backend

        backend = get_backend(self.backend)
        backend.check_widths(self.widths, "the bits planner's widths")
        if 4 in backend.formats or self.quant_type is not None:
            self.quant_type = backend.quant_type(self.quant_type)
        backend.check_widths([self.lm_head_bits], "lm_head_bits")
        self.int8_threshold = check_int8_threshold(self.int8_threshold)
        if self.score == "importance" and self.granularity != "layer":
            raise MiOptError("score='importance' uses layer ablation scores: use granularity='layer'")
        if self.lm_head_bits not in BIT_WIDTHS:
            raise MiOptError(f"lm_head_bits must be one of {BIT_WIDTHS}, got {self.lm_head_bits}")
        if self.batch_size < 1 or self.resolution < 10:
            raise MiOptError("batch_size must be >= 1 and resolution >= 10")


def solve_mckp(costs: list[list[int]], damages: list[list[float]], budget: int,
               resolution: int = 20000) -> tuple[list[int], bool]:
    """Multiple-choice knapsack: one option per item, min summed damage, summed cost <= budget.

    Returns (chosen option index per item, exact) where exact says no rounding was needed.
    Raises MiOptError when even the cheapest options exceed the budget.
    """
    n = len(costs)
    cheapest = sum(min(c) for c in costs)
    if cheapest > budget:
        raise MiOptError(f"the budget cannot be met: the cheapest allocation costs {cheapest:,}, budget {budget:,}")
    g = 0
    for c in costs:
        for x in c:
            g = math.gcd(g, int(x))
    g = math.gcd(g, int(budget)) if g else 1
    exact = budget // max(g, 1) <= resolution
    unit = g if exact else budget / resolution
    scaled = [[int(c // unit) if exact else math.ceil(c / unit) for c in row] for row in costs]
    cap = int(budget // unit)
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    choice = np.zeros((n, cap + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(cap + 1, inf)
        for j, (c, d) in enumerate(zip(scaled[i], damages[i])):
            if c > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[c:] = best[:cap + 1 - c] + d
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        best = new
    if not np.isfinite(best).any():
        raise MiOptError("the budget cannot be met after rounding costs; raise the budget or the resolution")
    c = int(np.argmin(best))
    picks = [0] * n
    for i in range(n - 1, -1, -1):
        j = int(choice[i, c])
        picks[i] = j
        c -= scaled[i][j]
    return picks, exact


def _unit_cost(sizes: dict, width: int, config: BitsConfig) -> int:
    return sizes["params"] * width if config.avg_bits is not None else sizes["bytes"][str(width)]


def allocation_size(sizes: dict[str, dict], bits: dict[str, int]) -> tuple[float, int]:
    """(mean bits per weight, bytes) of every unit in `sizes` at its width in `bits` (16 if absent)."""
    widths = {k: bits.get(k, 16) for k in sizes}
    params = sum(s["params"] for s in sizes.values())
    return (sum(sizes[k]["params"] * w for k, w in widths.items()) / params,
            sum(sizes[k]["bytes"][str(w)] for k, w in widths.items()))


def allocate_bits(damage: dict[str, dict[int, float]], sizes: dict[str, dict], config: BitsConfig) -> tuple[dict, dict]:
    """(bits per unit key, predicted cost) minimizing summed damage within the budget."""
    keys = list(damage)
    widths = [[w for w in config.widths if w == 16 or w in damage[k]] for k in keys]
    costs = [[_unit_cost(sizes[k], w, config) for w in ws] for k, ws in zip(keys, widths)]
    damages = [[0.0 if w == 16 else float(damage[k][w]) for w in ws] for k, ws in zip(keys, widths)]
    total_params = sum(sizes[k]["params"] for k in keys)
    budget = (int(math.floor(config.avg_bits * total_params)) if config.avg_bits is not None
              else int(config.max_bytes))
    try:
        picks, exact = solve_mckp(costs, damages, budget, config.resolution)
    except MiOptError as err:
        what = (f"avg_bits={config.avg_bits}" if config.avg_bits is not None else f"max_bytes={config.max_bytes:,}")
        floor = min(config.widths)
        raise MiOptError(f"bits budget {what} cannot be met with widths {config.widths}: even all-{floor}-bit "
                         f"needs {floor} avg bits / {sum(sizes[k]['bytes'][str(floor)] for k in keys):,} bytes. "
                         "Raise the budget or allow a lower width.") from err
    bits = {k: ws[j] for k, ws, j in zip(keys, widths, picks)}
    allocated = {k: sizes[k] for k in keys}
    avg_bits, linear_bytes = allocation_size(allocated, bits)
    predicted = {"avg_bits": round(avg_bits, 4), "linear_bytes": linear_bytes,
                 "linear_bytes_16bit": allocation_size(allocated, {})[1],
                 "predicted_damage": sum(d[j] for d, j in zip(damages, picks)),
                 "damage_metric": config.metric, "exact": exact,
                 "counts": {str(w): sum(1 for b in bits.values() if b == w) for w in config.widths}}
    return bits, predicted


def _importance_damage(profile: ImportanceProfile, sens_units: list[str], config: BitsConfig) -> dict:
    scores = unit_scores(profile, "layer", config.metric) if profile.units("layer") else {}
    layer_scores = {parse_unit(k).layer: v for k, v in scores.items()}
    missing = [k for k in sens_units if layer_of(k) not in layer_scores]
    if missing:
        raise MiOptError(f"score='importance' needs layer scores; the profile lacks {missing[:3]}")
    return {k: {w: max(layer_scores[layer_of(k)], 0.0) * _NOISE[w] for w in config.widths if w < 16} for k in sens_units}


def plan_bits(profile: ImportanceProfile, config: BitsConfig, ctx: PlanContext) -> CompressionPlan:
    if config.lm_head_bits < 16 and get_adapter(ctx.model).is_tied():
        raise MiOptError("lm_head_bits < 16 but this model ties lm_head to the embeddings; keep lm_head_bits=16 "
                         "(or untie it with mi_opt.surgery.quantize.untie_lm_head_ before planning)")
    if config.sensitivity:
        sens = QuantSensitivity.load(config.sensitivity)
        fp = profile.model.get("fingerprint")
        if fp and sens.model.get("fingerprint") not in (None, fp):
            raise MiOptError(f"{config.sensitivity} was measured on model {sens.model.get('fingerprint')}, the "
                             f"profile on {fp}: measure sensitivity on the same model")
        if sens.backend != config.backend:
            raise MiOptError(f"{config.sensitivity} was measured with quantization backend {sens.backend} "
                             f"({sens.method.get('backend_version', 'version not recorded')}), the config plans for "
                             f"{config.backend}: measure sensitivity with the backend the plan will use")
        if config.backend == "bitsandbytes" and sens.int8_threshold != config.int8_threshold and 8 in config.widths:
            raise MiOptError(f"{config.sensitivity} measured int8 with outlier threshold "
                             f"{sens.int8_threshold}, the config asks for {config.int8_threshold}: "
                             "measure sensitivity with the same int8_threshold")
        if sens.method.get("granularity") != config.granularity:
            raise MiOptError(f"{config.sensitivity} has {sens.method.get('granularity')} granularity, the config "
                             f"asks for {config.granularity}")
    elif config.score == "sensitivity":
        if ctx.windows is None:
            raise MiOptError("the bits planner measures quantization sensitivity on calibration windows: pass "
                             "windows= to make_plan, or a saved sensitivity file as sensitivity=")
        sens = measure_quant_sensitivity(ctx.model, ctx.windows, tuple(w for w in config.widths if w < 16) or (4,),
                                         config.granularity, config.quant_type, config.batch_size,
                                         int8_threshold=config.int8_threshold, progress=ctx.progress,
                                         backend=config.backend)
    else:
        sens = None
    if config.score == "importance":
        units = quant_units(get_adapter(ctx.model), "layer")
        sizes = unit_sizes(ctx.model, units, config.backend)
        damage = _importance_damage(profile, list(units), config)
    else:
        sizes = sens.sizes
        damage = {k: {int(w): v[config.metric] for w, v in per.items()} for k, per in sens.scores.items()}
    bits, predicted = allocate_bits(damage, sizes, config)
    plan_bits_map = {**bits, "embed": 16, "lm_head": config.lm_head_bits}
    budget = {"kind": "bits", "avg_bits": config.avg_bits, "max_bytes": config.max_bytes,
              "scope": "decoder-layer linears", "widths": list(config.widths)}
    planner = {"score": config.score, "backend": config.backend}
    if sens is not None:
        planner["sensitivity"] = {"path": config.sensitivity, "base_loss": sens.base_loss,
                                  "calibration": sens.calibration, "cost": sens.cost, "backend": sens.backend,
                                  "backend_version": sens.method.get("backend_version")}
    return CompressionPlan(model={}, bits=plan_bits_map, quant_type=config.quant_type,
                           int8_threshold=config.int8_threshold, backend=config.backend, budget=budget,
                           predicted=predicted, planner=planner)


PLANNERS.register("bits")(Planner(BitsConfig, plan_bits,
                                  "per-layer/module bit widths from measured quantization damage (knapsack)"))
