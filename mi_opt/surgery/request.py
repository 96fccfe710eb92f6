"""The checks every per-layer pruning request shares: a known mode, layers that exist."""
from __future__ import annotations

from torch import nn

from mi_opt.arch import ArchAdapter, get_adapter
from mi_opt.errors import MiOptError


def checked_adapter(model: nn.Module, prune: dict[int, list[int]], mode: str, modes: tuple[str, ...],
                    what: str) -> ArchAdapter:
    """The model's adapter once `mode` is one of `modes` and every layer of `prune` exists;
    `what` names the request in errors ("heads", "MLP neurons")."""
    if mode not in modes:
        raise MiOptError(f"{what} mode must be one of {modes}, got {mode!r}")
    adapter = get_adapter(model)
    n = adapter.n_layers()
    bad = sorted(i for i in prune if not 0 <= i < n)
    if bad:
        raise MiOptError(f"cannot prune {what} of layer(s) {bad}: the model has layers 0..{n - 1}")
    return adapter
