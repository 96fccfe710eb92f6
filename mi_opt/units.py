"""The key grammar: one string per addressable component, shared by profiles, plans and reports.

Unit keys (what a profile scores; `parse_unit`):

    L12        decoder layer 12 (whole block)
    L12.attn   its attention sublayer
    L12.mlp    its MLP sublayer
    L12.H3     query head 3
    L12.KV1    KV group 1 (all query heads that read KV head 1)
    L12.mlp.N0-63   MLP intermediate neurons 0..63 (inclusive) of layer 12; one neuron: L12.mlp.N5

Module keys (what a plan's `bits` quantizes; `parse_module_key`):

    L12                     every linear of decoder layer 12
    L12.self_attn.q_proj    one module, path relative to the layer (or every linear under it)
    embed, lm_head          the token embedding and the output projection

Every key starts with its layer (`layer_of`), so code that only needs "which layer" never
parses a key itself. A new unit kind is one more row in `_UNIT_SUFFIXES` (a range uses
`Unit.stop` too, as neuron groups do); nothing else reads key strings.

This module also holds the plan vocabularies that several packages check against.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from mi_opt.errors import MiOptError

KINDS = ("layer", "attn", "mlp", "head", "kv_group", "neurons")
# What a profile scores unless told otherwise: neuron groups are many (SmolLM2: 720 of 64) and
# only width planners read them, so they are asked for by name.
DEFAULT_KINDS = ("layer", "attn", "mlp", "head", "kv_group")
NEURON_GROUP = 64  # default neurons per group: fine enough to plan with, few enough to ablate
SPECIAL_MODULES = ("embed", "lm_head")  # module keys that name no decoder layer

# Vocabularies, defined once: bit widths of a plan (16 = leave as is), head-pruning modes
# ("uniform": plain-transformers loadable; "free": any heads per layer), the same two modes
# for MLP widths, and 4-bit formats. Width 5 exists only where a backend offers it (GGUF's Q5_0 /
# Q5_1: llama.cpp's fallback for rows that K-quants cannot split); each backend declares its own.
BIT_WIDTHS = (4, 5, 8, 16)
PLANNER_WIDTHS = (4, 8, 16)  # what the bits planner tries unless told: the widths every backend offers
HEAD_MODES = ("uniform", "free")
WIDTH_MODES = HEAD_MODES  # MLP neuron pruning: "uniform" (one intermediate size) or "free" (per layer)
QUANT_TYPES = ("nf4", "fp4")

# unit kind -> (how its key continues after "L<n>", the pattern that reads it back; the
# pattern's group is the index). One row per kind: formatting and parsing cannot drift apart.
_UNIT_SUFFIXES = {"layer": ("", r""), "attn": (".attn", r"\.attn"), "mlp": (".mlp", r"\.mlp"),
                  "head": (".H{index}", r"\.H(\d+)"), "kv_group": (".KV{index}", r"\.KV(\d+)"),
                  "neurons": (".mlp.N{index}{last}", r"\.mlp\.N(\d+)(?:-(\d+))?")}
_UNIT_PATTERNS = {kind: re.compile(rf"^L(\d+){pattern}$") for kind, (_, pattern) in _UNIT_SUFFIXES.items()}
_MODULE_PATTERN = re.compile(r"^L(\d+)(?:\.([A-Za-z_][\w.]*))?$")
_LAYER_PREFIX = re.compile(r"^L(\d+)(?:\.|$)")

UNIT_GRAMMAR = "L<n>, L<n>.attn, L<n>.mlp, L<n>.H<h>, L<n>.KV<g>, L<n>.mlp.N<i> or L<n>.mlp.N<first>-<last>"
MODULE_GRAMMAR = "L<i>, L<i>.<module path> (e.g. L3.self_attn.q_proj), embed or lm_head"


class BadKey(MiOptError):
    """A key that the grammar does not produce: the one error every key parser raises."""

    def __init__(self, key, what: str, grammar: str):
        super().__init__(f"{what} {key!r}; expected {grammar}")


@dataclass(frozen=True, order=True)
class Unit:
    layer: int
    kind: str
    index: int = -1  # head or KV-group index, first neuron of a group; -1 for layer, attn, mlp
    stop: int = -1   # neurons: one past the group's last neuron; -1 for every other kind

    @property
    def key(self) -> str:
        last = f"-{self.stop - 1}" if self.kind == "neurons" and self.stop - self.index > 1 else ""
        return f"L{self.layer}" + _UNIT_SUFFIXES[self.kind][0].format(index=self.index, last=last)

    @property
    def neurons(self) -> range:
        """The MLP intermediate neurons a neuron-group unit names (empty for other kinds)."""
        return range(self.index, self.stop) if self.kind == "neurons" else range(0)

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class ModuleKey:
    """A quantization target: a whole layer, a module path inside one, or embed / lm_head."""

    layer: int | None        # None for embed and lm_head
    path: str | None = None  # relative to the layer; None: the whole layer (or a special module)
    special: str | None = None  # "embed" or "lm_head"

    @property
    def key(self) -> str:
        if self.special:
            return self.special
        return f"L{self.layer}" + (f".{self.path}" if self.path else "")

    def __str__(self) -> str:
        return self.key


def parse_unit(key: str) -> Unit:
    """The unit a profile key names; BadKey for anything else."""
    if isinstance(key, str):
        for kind, pattern in _UNIT_PATTERNS.items():
            m = pattern.match(key)
            if m and kind == "neurons":
                first, last = int(m.group(2)), int(m.group(3) if m.group(3) is not None else m.group(2))
                if last < first:
                    raise BadKey(key, "bad neuron range (last before first) in unit key", UNIT_GRAMMAR)
                return Unit(int(m.group(1)), kind, first, last + 1)
            if m:
                layer, *index = m.groups()
                return Unit(int(layer), kind, int(index[0]) if index else -1)
    raise BadKey(key, "bad unit key", UNIT_GRAMMAR)


def parse_module_key(key: str) -> ModuleKey:
    """The target a plan's bits key names; BadKey (an 'unknown bits target') for anything else."""
    if key in SPECIAL_MODULES:
        return ModuleKey(None, special=key)
    m = _MODULE_PATTERN.match(key) if isinstance(key, str) else None
    if not m:
        raise BadKey(key, "unknown bits target", MODULE_GRAMMAR)
    return ModuleKey(int(m.group(1)), m.group(2))


def layer_of(key: str) -> int | None:
    """The decoder layer any unit or module key addresses; None for embed and lm_head."""
    if key in SPECIAL_MODULES:
        return None
    m = _LAYER_PREFIX.match(key) if isinstance(key, str) else None
    if not m:
        raise BadKey(key, "bad unit or module key", f"{UNIT_GRAMMAR}, or {MODULE_GRAMMAR}")
    return int(m.group(1))


def in_layers(key: str, layers) -> bool:
    """True when `key` addresses one of `layers` (embed and lm_head never do)."""
    layer = layer_of(key)
    return layer is not None and layer in layers


def key_order(key: str) -> tuple[int, str]:
    """Sort key: by layer (embed and lm_head first), then by the key itself."""
    layer = layer_of(key)
    return (-1 if layer is None else layer, key)


def check_layer(key: str, layer: int, n_layers: int, what: str = "bits target") -> None:
    if not 0 <= layer < n_layers:
        raise MiOptError(f"{what} {key!r}: the model has layers 0..{n_layers - 1}")


def resolve_unit(adapter, unit: Unit) -> nn.Module:
    """The module a unit lives in: its layer, attention or MLP sublayer (heads: the attention;
    neuron groups: the MLP, after checking the neurons exist)."""
    check_layer(unit.key, unit.layer, adapter.n_layers(), "unit")
    layer = adapter.layers()[unit.layer]
    if unit.kind == "layer":
        return layer
    if unit.kind == "neurons":
        check_neurons(adapter, unit)
    if unit.kind in ("mlp", "neurons"):
        return adapter.mlp(layer)
    return adapter.attention(layer)


def resolve_linears(adapter, key: str | ModuleKey) -> dict[str, nn.Module]:
    """Full module name -> module of every full-precision linear a module key names.

    Checks the layer range and that the path exists; an existing path with no linear left under
    it (e.g. already quantized) resolves to {} so the caller can say why in its own terms.
    """
    target = parse_module_key(key) if isinstance(key, str) else key
    names = {id(m): n for n, m in adapter.model.named_modules()}
    if target.special:
        module = adapter.lm_head() if target.special == "lm_head" else adapter.embedding()
        return {names[id(module)]: module}
    check_layer(target.key, target.layer, adapter.n_layers())
    layer = adapter.layers()[target.layer]
    path = target.path
    if path is not None and path not in dict(layer.named_modules()):
        linears = sorted(adapter.linear_modules(layer))
        raise MiOptError(f"bits target {target.key!r} matches no linear module of layer {target.layer}: it has "
                         f"no module {path!r}; its linear modules are {', '.join(linears) or 'none'}")
    return {names[id(m)]: m for p, m in adapter.full_precision_linears(layer).items()
            if path is None or p == path or p.startswith(path + ".")}


def check_neurons(adapter, unit: Unit) -> None:
    """The neurons of a neuron-group unit exist in its layer's MLP."""
    width = adapter.mlp_width(unit.layer)
    if unit.stop > width:
        raise MiOptError(f"unit {unit.key}: layer {unit.layer}'s MLP has neurons 0..{width - 1}")


def neuron_groups(layer: int, width: int, group: int = NEURON_GROUP) -> list[Unit]:
    """Consecutive groups of `group` neurons covering an MLP of `width` (the last may be smaller)."""
    if group < 1:
        raise MiOptError(f"neuron group size must be >= 1, got {group}")
    return [Unit(layer, "neurons", i, min(i + group, width)) for i in range(0, width, group)]


def enumerate_units(adapter, kinds: tuple[str, ...] = DEFAULT_KINDS, neuron_group: int = NEURON_GROUP) -> list[Unit]:
    """Every unit of the requested kinds, layer by layer. KV groups only where they differ from heads;
    neuron groups of `neuron_group` consecutive neurons."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise MiOptError(f"unknown unit kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    units = []
    for layer in range(adapter.n_layers()):
        # Head geometry only when heads are asked for: a layer may have no attention heads left.
        geo = adapter.heads(layer) if {"head", "kv_group"} & set(kinds) else None
        if "layer" in kinds:
            units.append(Unit(layer, "layer"))
        if "attn" in kinds:
            units.append(Unit(layer, "attn"))
        if "mlp" in kinds:
            units.append(Unit(layer, "mlp"))
        if "head" in kinds:
            units += [Unit(layer, "head", h) for h in range(geo.n_heads)]
        if "kv_group" in kinds and geo.group_size > 1:
            units += [Unit(layer, "kv_group", g) for g in range(geo.n_kv_heads)]
        if "neurons" in kinds:
            units += neuron_groups(layer, adapter.mlp_width(layer), neuron_group)
    return units
