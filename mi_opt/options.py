"""Plain options (a recipe section, CLI flags) to a config dataclass: the one parser.

Scorer and planner configs are dataclasses whose `__post_init__` checks values. Before that
runs, this checks what a YAML file can get wrong: an unknown key, or a value of the wrong type
(`batch_size: "two"`), and names the key, instead of a traceback from deep inside a check.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from mi_opt.errors import MiOptError

_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}


def _accepts(tp, value) -> bool | None:
    """Whether `value` fits annotation `tp`; None when the annotation is not one this checks."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(t, value) for t in typing.get_args(tp)]
        return True if any(verdicts) else (None if None in verdicts else False)
    if tp is type(None):
        return value is None
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        inner = typing.get_args(tp)[:1]
        return all(_accepts(inner[0], v) is not False for v in value) if inner and inner[0] is not Ellipsis else True
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return None


def _describe(tp) -> str:
    args = [t for t in typing.get_args(tp) if t is not type(None)] if typing.get_origin(tp) in (
        typing.Union, types.UnionType) else [tp]
    names = [_SCALARS.get(t) or ("a list" if typing.get_origin(t) in (tuple, list) else getattr(t, "__name__", str(t)))
             for t in args]
    optional = len(args) < len(typing.get_args(tp))
    return " or ".join(names) + (" (or null)" if optional else "")


def parse_options(cls: type, options: Any, what: str) -> Any:
    """An instance of config dataclass `cls` from None (defaults), a dict or an instance.

    what: how errors name the options' owner, e.g. "scorer 'ablation'" or "LayerSkipConfig".
    """
    if options is None:
        return cls()
    if isinstance(options, cls):
        return options
    if not isinstance(options, dict):
        raise MiOptError(f"{what} options must be a mapping or {cls.__name__}, got {type(options).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise MiOptError(f"unknown {what} option(s) {unknown}: there is no option of that name; "
                         f"valid: {', '.join(sorted(fields))}")
    options = dict(options)
    if isinstance(options.get("unit_kinds"), str):  # "layer,head" from a CLI flag
        options["unit_kinds"] = tuple(k.strip() for k in options["unit_kinds"].split(","))
    hints = typing.get_type_hints(cls)
    for key, value in options.items():
        if _accepts(hints.get(key, Any), value) is False:
            raise MiOptError(f"{what} option {key!r} must be {_describe(hints[key])}, got {value!r}")
    return cls(**options)
