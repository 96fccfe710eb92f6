"""Remove attention heads physically: slice the projections, fix the bookkeeping.

Query head h reads KV head h // group_size. After pruning, a layer may keep different
numbers of query heads per KV group, which transformers' attention (one `repeat_kv`
factor per layer) cannot express. We regroup instead: with s = gcd of the kept heads per
surviving group, each group's kept heads are split into chunks of s, and every chunk gets
its own copy of the group's K/V rows. Outputs are identical; only K/V rows are duplicated,
and when every group keeps the same count (uniform pruning) nothing is duplicated.
A group whose query heads all go loses its K/V rows too.
"""
from __future__ import annotations

from math import gcd
from typing import Iterable

from torch import nn

from mi_opt.arch import ArchAdapter, HeadGeometry, HeadLayout, get_adapter
from mi_opt.errors import MiOptError
from mi_opt.surgery.request import checked_adapter
from mi_opt.units import HEAD_MODES

def head_layout(geo: HeadGeometry, pruned: Iterable[int]) -> HeadLayout:
    """The layout left after deleting query heads `pruned` from a layer of geometry `geo`."""
    pruned = set(pruned)
    bad = sorted(h for h in pruned if not 0 <= h < geo.n_heads)
    if bad:
        raise MiOptError(f"head(s) {bad} do not exist; the layer has heads 0..{geo.n_heads - 1}")
    keep = tuple(h for h in range(geo.n_heads) if h not in pruned)
    if not keep:
        raise MiOptError(f"pruning would remove all {geo.n_heads} heads of a layer; keep at least one "
                         "(drop the layer instead)")
    counts = {}
    for h in keep:
        counts[h // geo.group_size] = counts.get(h // geo.group_size, 0) + 1
    step = 0
    for c in counts.values():
        step = gcd(step, c)
    kv_sources = tuple(g for g, c in sorted(counts.items()) for _ in range(c // step))
    return HeadLayout(keep_heads=keep, kv_sources=kv_sources, head_dim=geo.head_dim)


def apply_layout_(adapter: ArchAdapter, layer_index: int, layout: HeadLayout) -> None:
    """Reshape one layer's attention to `layout` (weights are sliced/copied accordingly)."""
    adapter.reshape_heads_(layer_index, layout)


def plan_layouts(model: nn.Module, prune: dict[int, list[int]], mode: str,
                 ignore_layers: Iterable[int] = ()) -> dict[int, HeadLayout]:
    """Check a head-pruning request (current layer numbering) and return each layer's layout.

    `ignore_layers` are about to be deleted: the uniform check skips them.
    """
    adapter = checked_adapter(model, prune, mode, HEAD_MODES, "heads")
    n = adapter.n_layers()
    layouts = {}
    for i, heads in prune.items():
        try:
            layouts[i] = head_layout(adapter.heads(i), heads)
        except MiOptError as err:
            raise MiOptError(f"layer {i}: {err}") from None
    if mode == "uniform" and layouts:
        ignore = set(ignore_layers)
        shapes = {(adapter.heads(i).n_heads, adapter.heads(i).n_kv_heads) if i not in layouts
                  else (layouts[i].n_heads, layouts[i].n_kv_heads) for i in range(n) if i not in ignore}
        duplicated = [i for i, lay in layouts.items() if len(set(lay.kv_sources)) != lay.n_kv_heads]
        if len(shapes) > 1 or duplicated:
            raise MiOptError(
                "head_mode 'uniform' needs the same query heads per KV group in every layer (so plain "
                f"transformers can load it); this plan leaves (heads, kv heads) per layer {sorted(shapes)}"
                f"{' and uneven groups in layers ' + str(sorted(duplicated)) if duplicated else ''}. "
                "Use head_mode 'free' (loads with mi_opt.load_compressed) or a uniform planner.")
    return layouts


def prune_heads_(model: nn.Module, prune: dict[int, list[int]], mode: str = "free",
                 ignore_layers: Iterable[int] = ()) -> dict[int, HeadLayout]:
    """Delete query heads in place: `prune` maps a layer (current numbering) to its heads."""
    layouts = plan_layouts(model, prune, mode, ignore_layers)
    adapter = get_adapter(model)
    for i, layout in layouts.items():
        apply_layout_(adapter, i, layout)
    if layouts:
        ignore = set(ignore_layers)
        shapes = {(adapter.heads(i).n_heads, adapter.heads(i).n_kv_heads)
                  for i in range(adapter.n_layers()) if i not in ignore}
        adapter.record_head_shapes_(next(iter(layouts.values())).head_dim, shapes)
    return layouts


def reshape_heads_(model: nn.Module, shapes: list[tuple[int, int]]) -> None:
    """Give every layer the (n_heads, n_kv_heads) shapes in `shapes`, with placeholder weights.

    Used by the loader: a freshly built model gets the pruned shapes before the saved
    weights are loaded into it.
    """
    adapter = get_adapter(model)
    if len(shapes) != adapter.n_layers():
        raise MiOptError(f"head shapes list {len(shapes)} layers but the model has {adapter.n_layers()}")
    for i, (n_heads, n_kv) in enumerate(shapes):
        geo = adapter.heads(i)
        if (n_heads, n_kv) == (geo.n_heads, geo.n_kv_heads):
            continue
        if n_heads > geo.n_heads or n_heads % n_kv:
            raise MiOptError(f"layer {i}: saved shape {n_heads} heads / {n_kv} KV heads does not fit "
                             f"the config's {geo.n_heads} heads")
        apply_layout_(adapter, i, adapter.placeholder_layout(n_heads, n_kv, geo.head_dim))
