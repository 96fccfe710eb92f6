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

from dataclasses import dataclass
from math import gcd
from typing import Iterable

import torch
from torch import nn

from mi_opt.arch import ArchAdapter, HeadGeometry, get_adapter
from mi_opt.errors import MiOptError

MODES = ("uniform", "free")


@dataclass(frozen=True)
class HeadLayout:
    """What one attention layer keeps, in the numbering of the layer before pruning."""

    keep_heads: tuple[int, ...]   # query heads kept, in order
    kv_sources: tuple[int, ...]   # for each new KV head, the old KV head whose rows it copies
    head_dim: int

    @property
    def n_heads(self) -> int:
        return len(self.keep_heads)

    @property
    def n_kv_heads(self) -> int:
        return len(self.kv_sources)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


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


def _unit_rows(units: Iterable[int], width: int, offset: int = 0) -> torch.Tensor:
    return torch.cat([torch.arange(offset + u * width, offset + (u + 1) * width) for u in units])


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous().clone(), requires_grad=old.requires_grad))


def _slice_linear(lin: nn.Linear, out_rows: torch.Tensor | None = None, in_cols: torch.Tensor | None = None) -> None:
    if not isinstance(lin, nn.Linear) or type(lin).__module__.startswith("bitsandbytes"):
        raise MiOptError(f"cannot prune heads of a {type(lin).__name__}: prune heads before quantizing")
    w = lin.weight.data
    if out_rows is not None:
        w = w[out_rows.to(w.device)]
        if lin.bias is not None:
            _set_param(lin, "bias", lin.bias.data[out_rows.to(w.device)])
        lin.out_features = w.shape[0]
    if in_cols is not None:
        w = w[:, in_cols.to(w.device)]
        lin.in_features = w.shape[1]
    _set_param(lin, "weight", w)


def _apply_llama_like(attn: nn.Module, layout: HeadLayout) -> None:
    hd = layout.head_dim
    q_rows = _unit_rows(layout.keep_heads, hd)
    kv_rows = _unit_rows(layout.kv_sources, hd)
    _slice_linear(attn.q_proj, out_rows=q_rows)
    _slice_linear(attn.k_proj, out_rows=kv_rows)
    _slice_linear(attn.v_proj, out_rows=kv_rows)
    _slice_linear(attn.o_proj, in_cols=q_rows)
    # Eager and sdpa attention read num_key_value_groups for repeat_kv / GQA; older or other
    # attention classes keep num_heads / num_key_value_heads: update whichever exist.
    attn.num_key_value_groups = layout.group_size
    for name, value in (("num_heads", layout.n_heads), ("num_key_value_heads", layout.n_kv_heads),
                        ("num_attention_heads", layout.n_heads)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def _apply_gpt2(attn: nn.Module, layout: HeadLayout) -> None:
    hd, width = layout.head_dim, attn.split_size
    keep = layout.keep_heads
    # c_attn is a Conv1D with weight (in, 3*width): columns [q | k | v], each head-major.
    cols = torch.cat([_unit_rows(keep, hd, offset) for offset in (0, width, 2 * width)])
    c_attn, c_proj = attn.c_attn, attn.c_proj
    _set_param(c_attn, "weight", c_attn.weight.data[:, cols.to(c_attn.weight.device)])
    _set_param(c_attn, "bias", c_attn.bias.data[cols.to(c_attn.bias.device)])
    c_attn.nf = len(cols)
    _set_param(c_proj, "weight", c_proj.weight.data[_unit_rows(keep, hd).to(c_proj.weight.device)])
    c_proj.nx = c_proj.weight.shape[0]
    attn.split_size = len(keep) * hd
    attn.num_heads = len(keep)


def apply_layout_(adapter: ArchAdapter, layer_index: int, layout: HeadLayout) -> None:
    """Reshape one layer's attention to `layout` (weights are sliced/copied accordingly)."""
    attn = adapter.attention(adapter.layers()[layer_index])
    if adapter.family == "gpt2":
        if layout.kv_sources != layout.keep_heads:
            raise MiOptError("GPT-2 has one KV head per query head; its layout cannot regroup heads")
        _apply_gpt2(attn, layout)
    else:
        _apply_llama_like(attn, layout)


def plan_layouts(model: nn.Module, prune: dict[int, list[int]], mode: str,
                 ignore_layers: Iterable[int] = ()) -> dict[int, HeadLayout]:
    """Check a head-pruning request (current layer numbering) and return each layer's layout.

    `ignore_layers` are about to be deleted: the uniform check skips them.
    """
    if mode not in MODES:
        raise MiOptError(f"head mode must be one of {MODES}, got {mode!r}")
    adapter = get_adapter(model)
    n = adapter.n_layers()
    bad = sorted(i for i in prune if not 0 <= i < n)
    if bad:
        raise MiOptError(f"cannot prune heads of layer(s) {bad}: the model has layers 0..{n - 1}")
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
        cfg = model.config.get_text_config()
        if adapter.family != "gpt2":
            # hidden_size / num_heads no longer gives head_dim, so keep it explicit in the config.
            cfg.head_dim = next(iter(layouts.values())).head_dim
        ignore = set(ignore_layers)
        shapes = {(adapter.heads(i).n_heads, adapter.heads(i).n_kv_heads)
                  for i in range(adapter.n_layers()) if i not in ignore}
        if len(shapes) == 1 and adapter.family != "gpt2":
            # Every layer has the same shape (always so in uniform mode): the config's single head
            # count can say it, so plain transformers can load the result.
            cfg.num_attention_heads, cfg.num_key_value_heads = shapes.pop()
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
        keep = tuple(range(n_heads))
        kv = keep if adapter.family == "gpt2" else tuple(0 for _ in range(n_kv))
        apply_layout_(adapter, i, HeadLayout(keep_heads=keep, kv_sources=kv, head_dim=geo.head_dim))
