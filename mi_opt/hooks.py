"""The one place where mi-opt attaches PyTorch hooks.

Hooks exist only inside `attached(...)` and are removed in `finally`, so an exception in
the middle of a sweep never leaves a model silently modified. Besides PyTorch's forward and
forward-pre hooks there is "replace": `fn` stands in for the module's forward (the module's
own hooks still run around it), for a replay that knows a sublayer's output without computing it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

from torch import nn


@dataclass(frozen=True)
class Hook:
    module: nn.Module
    fn: Callable
    kind: Literal["forward", "forward_pre", "replace"] = "forward"
    with_kwargs: bool = False


@contextmanager
def attached(hooks: list[Hook]) -> Iterator[None]:
    handles, replaced = [], []
    try:
        for h in hooks:
            if h.kind == "replace":
                replaced.append((h.module, h.module.__dict__.get("forward")))
                h.module.forward = h.fn
                continue
            register = h.module.register_forward_hook if h.kind == "forward" else h.module.register_forward_pre_hook
            handles.append(register(h.fn, with_kwargs=h.with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, own in reversed(replaced):  # an instance forward set before us (accelerate's) comes back
            if own is None:
                del module.forward
            else:
                module.forward = own
