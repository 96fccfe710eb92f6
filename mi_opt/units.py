"""Unit keys: one string per addressable component, shared by profiles, plans and reports.

    L12        decoder layer 12 (whole block)
    L12.attn   its attention sublayer
    L12.mlp    its MLP sublayer
    L12.H3     query head 3
    L12.KV1    KV group 1 (all query heads that read KV head 1)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mi_opt.errors import MiOptError

KINDS = ("layer", "attn", "mlp", "head", "kv_group")
_PATTERN = re.compile(r"^L(\d+)(?:\.(attn|mlp)|\.H(\d+)|\.KV(\d+))?$")


@dataclass(frozen=True, order=True)
class Unit:
    layer: int
    kind: str
    index: int = -1  # head or KV-group index; -1 for layer, attn, mlp

    @property
    def key(self) -> str:
        suffix = {"layer": "", "attn": ".attn", "mlp": ".mlp", "head": f".H{self.index}",
                  "kv_group": f".KV{self.index}"}[self.kind]
        return f"L{self.layer}{suffix}"

    def __str__(self) -> str:
        return self.key


def parse_unit(key: str) -> Unit:
    m = _PATTERN.match(key)
    if not m:
        raise MiOptError(f"bad unit key {key!r}; expected L<n>, L<n>.attn, L<n>.mlp, L<n>.H<h> or L<n>.KV<g>")
    layer, sub, head, kv = m.groups()
    if head is not None:
        return Unit(int(layer), "head", int(head))
    if kv is not None:
        return Unit(int(layer), "kv_group", int(kv))
    return Unit(int(layer), sub or "layer")


def enumerate_units(adapter, kinds: tuple[str, ...] = KINDS) -> list[Unit]:
    """Every unit of the requested kinds, layer by layer. KV groups only where they differ from heads."""
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
    return units
