"""Combined plans: drop layers, then prune heads of the layers that remain, then bit widths.

Head scores come from the profile of the full model; after layers go, the remaining heads'
importance can shift. Re-profile the layer-dropped model for a sharper head plan.
"""
from __future__ import annotations

from dataclasses import dataclass

from mi_opt.errors import MiOptError
from mi_opt.plan import CompressionPlan
from mi_opt.policy.base import PLANNERS, PlanContext, Planner, parse_config
from mi_opt.policy.head_prune import HeadPruneConfig, choose_heads
from mi_opt.policy.layer_skip import LayerSkipConfig, plan_layer_skip
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.units import in_layers


@dataclass
class CombinedConfig:
    layer_skip: dict | None = None   # LayerSkipConfig options, or None to keep every layer
    head_prune: dict | None = None   # HeadPruneConfig options, or None to keep every head
    bits: dict | None = None         # {"planner": <registered bits planner>, **its options}, or None

    def __post_init__(self):
        if not (self.layer_skip or self.head_prune or self.bits):
            raise MiOptError("combined planner needs at least one of layer_skip, head_prune, bits")
        # Parse now so a bad option fails before any work starts.
        if self.layer_skip is not None:
            parse_config(LayerSkipConfig, self.layer_skip)
        if self.head_prune is not None:
            parse_config(HeadPruneConfig, self.head_prune)
        if self.bits is not None and "planner" not in self.bits:
            raise MiOptError("combined bits section needs 'planner': the name of a registered bits planner")


def merge_bits(plan: CompressionPlan, bits_plan: CompressionPlan) -> None:
    """Merge a bits planner's output into a structural plan.

    Bits targets inside dropped layers are discarded (the weights are deleted anyway); the
    bits planner's predicted bytes are kept under predicted["bits"], since the bytes of a
    mixed-width model depend on the quantization backend's formats.
    """
    dropped = set(plan.drop_layers)
    plan.bits = {k: b for k, b in bits_plan.bits.items() if not in_layers(k, dropped)}
    plan.quant_type = bits_plan.quant_type
    plan.int8_threshold = bits_plan.int8_threshold
    plan.backend = bits_plan.backend
    plan.predicted["bits"] = bits_plan.predicted
    plan.budget["bits"] = bits_plan.budget


def plan_combined(profile: ImportanceProfile, config: CombinedConfig, ctx: PlanContext) -> CompressionPlan:
    drop, rounds = [], []
    if config.layer_skip is not None:
        layer_plan = plan_layer_skip(profile, parse_config(LayerSkipConfig, config.layer_skip), ctx)
        drop, rounds = layer_plan.drop_layers, layer_plan.planner.get("rounds", [])
    prune, mode = {}, "uniform"
    if config.head_prune is not None:
        head_cfg = parse_config(HeadPruneConfig, config.head_prune)
        prune, mode = choose_heads(profile, head_cfg, ctx, skip_layers=drop), head_cfg.mode
    plan = CompressionPlan(model={}, drop_layers=drop, prune_heads=prune, head_mode=mode,
                           budget={"layer_skip": config.layer_skip, "head_prune": config.head_prune},
                           predicted=ctx.cost.predicted(drop, prune), planner={"rounds": rounds} if rounds else {})
    if config.bits is not None:
        # The bits planner scores quantization damage on the uncompressed model; its output is
        # merged here, the one place where structural and precision plans meet.
        options = {k: v for k, v in config.bits.items() if k != "planner"}
        bits_planner = PLANNERS.get(config.bits["planner"])
        merge_bits(plan, bits_planner.fn(profile, parse_config(bits_planner.config_cls, options), ctx))
    return plan


PLANNERS.register("combined")(Planner(CombinedConfig, plan_combined,
                                      "drop layers, then prune heads of the rest, then bit widths"))
