"""Render lm-eval task templates in Jinja's sandbox while mi-opt runs tasks it did not ship.

lm-eval renders every `doc_to_text` / `doc_to_target` / `doc_to_choice` template with one
module-level, unsandboxed `jinja2.Environment` (`lm_eval.utils.env`, read by `apply_template`
at each call), so a task file can reach Python through `{{ cycler.__init__.__globals__.os }}`.
A task YAML is data people share; rendering it must not run code. The sandbox is swapped in for
the duration of one evaluation and the original put back, so nothing outside is changed.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def sandboxed_templates() -> Iterator[None]:
    """lm-eval renders templates in an ImmutableSandboxedEnvironment inside this block."""
    import lm_eval.utils as lm_utils
    from jinja2 import BaseLoader, StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    original = lm_utils.env
    # The same settings lm-eval uses, so safe templates render exactly as before.
    sandbox = ImmutableSandboxedEnvironment(loader=BaseLoader, undefined=StrictUndefined,
                                            keep_trailing_newline=True)
    sandbox.filters.update({k: f for k, f in original.filters.items() if k not in sandbox.filters})
    lm_utils.env = sandbox
    try:
        yield
    finally:
        lm_utils.env = original
