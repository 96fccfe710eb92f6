"""The one place where mi-opt attaches PyTorch hooks.

Hooks exist only inside `attached(...)` and are removed in `finally`, so an exception in
the middle of a sweep never leaves a model silently modified.
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
    kind: Literal["forward", "forward_pre"] = "forward"
    with_kwargs: bool = False


@contextmanager
def attached(hooks: list[Hook]) -> Iterator[None]:
    handles = []
    try:
        for h in hooks:
            register = h.module.register_forward_hook if h.kind == "forward" else h.module.register_forward_pre_hook
            handles.append(register(h.fn, with_kwargs=h.with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()
