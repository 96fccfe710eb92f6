"""Recipes: one YAML (or Python) description of a whole compression run.

    model:    which model, dtype, device
    data:     calibration text and windows
    profile:  scorer name + its options (mi_opt.profile.scorers)
    policy:   planner name + its options (mi_opt.policy)
    heal:     optional recovery after apply: HealConfig fields (mi_opt.heal.config)
    evaluate: EvalConfig fields (mi_opt.evaluate.config)
    export:   whether to write a checkpoint, and in which format (safetensors, or gguf for llama.cpp)

Loading is strict: an unknown key, a wrong type or an out-of-range value is an error naming
the key path (e.g. `policy.options.n_drop`) and what is allowed. Scorer and planner options
are checked against their config dataclasses, so `mi-opt validate` needs no model.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mi_opt.errors import MiOptError
from mi_opt.evaluate.config import EvalConfig, SpeedConfig
from mi_opt.heal.config import HealConfig


@dataclass
class ModelSection:
    name: str = "smollm2-135m"      # bundled name, folder, .gguf file or hub id
    dtype: str = "fp32"             # fp32, bf16, fp16
    device: str = "cpu"             # cpu, cuda, cuda:N, auto

    def __post_init__(self):
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise MiOptError(f"dtype must be fp32, bf16 or fp16, got {self.dtype!r}")


@dataclass
class DataSection:
    calibration: str = "handbook"   # text source (mi_opt.data.load_text), e.g. "handbook+synthetic:arithmetic"
    n_samples: int = 16             # calibration windows
    seq_len: int = 128              # tokens per window
    seed: int = 0

    def __post_init__(self):
        if self.n_samples < 1 or self.seq_len < 2:
            raise MiOptError(f"n_samples must be >= 1 and seq_len >= 2 (got {self.n_samples}, {self.seq_len})")


@dataclass
class ProfileSection:
    scorer: str = "ablation"        # a registered scorer: mi-opt validate lists them
    options: dict = field(default_factory=dict)  # that scorer's config fields


@dataclass
class PolicySection:
    planner: str = "layer-skip"     # a registered planner
    options: dict = field(default_factory=dict)  # that planner's config fields


EXPORT_FORMATS = ("safetensors", "gguf")


@dataclass
class ExportSection:
    enabled: bool = True            # write a verified checkpoint into the run folder
    format: str = "safetensors"     # or "gguf": one .gguf for llama.cpp; the compressed model is then
                                    # evaluated with the GGUF-quantized weights (mi_opt.formats.gguf.apply_gguf_)
    gguf: dict = field(default_factory=dict)  # GgufOptions fields (float_type, types, vocab_from, quantizer) for format gguf

    def __post_init__(self):
        if self.format not in EXPORT_FORMATS:
            raise MiOptError(f"format: {self.format!r} is not an export format; use one of {', '.join(EXPORT_FORMATS)}")
        if self.gguf and self.format != "gguf":
            raise MiOptError("gguf: options given but format is not gguf; set format: gguf or remove them")
        if self.format == "gguf":
            try:  # unknown keys and types the installed writer lacks fail at load time, naming export.gguf
                self.gguf_options().mapping()
            except MiOptError as err:
                if str(err).startswith("unknown key"):  # already names export.gguf.<key>
                    raise
                raise MiOptError(f"gguf: {err}") from None

    def gguf_options(self):
        from mi_opt.formats.gguf_types import GgufOptions

        return build(GgufOptions, self.gguf, "export.gguf")


# A recipe's name becomes its run folder (OUT/<name>), and recipes are files people share: only a
# plain folder name is allowed, so no name can reach outside OUT (no separators, no "..", no
# leading "." or "_" that would hide a run or collide with OUT/_baseline).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RESERVED_NAMES = {"comparison"}  # OUT/comparison is written by compare-recipes


def check_name(name: str) -> None:
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name or name in RESERVED_NAMES:
        raise MiOptError(f"name: {name!r} cannot name a run folder; use 1-100 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit, without '..' (and not {', '.join(RESERVED_NAMES)})")


@dataclass
class Recipe:
    name: str                       # the run folder's name: letters, digits, '.', '_', '-' (check_name)
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    policy: PolicySection = field(default_factory=PolicySection)
    heal: HealConfig | None = None  # recovery after apply (mi_opt.heal); None = none, {} = the defaults
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    export: ExportSection = field(default_factory=ExportSection)

    def __post_init__(self):
        check_name(self.name)
        check_plugins(self)
        if self.heal and self.export.format == "gguf":
            raise MiOptError("heal with export.format gguf is not supported yet: healing updates bitsandbytes or "
                             "float weights that the GGUF writer would round again, so the file would not be the "
                             "healed model that was evaluated; export safetensors, or drop heal")
        self._check_backend()
        if self.heal and self.heal.eval_seq_len != self.evaluate.ppl_seq_len:
            raise MiOptError(f"heal.eval_seq_len ({self.heal.eval_seq_len}) must equal evaluate.ppl_seq_len "
                             f"({self.evaluate.ppl_seq_len}): it is how healing keeps clear of the evaluation text")

    def _check_backend(self) -> None:
        """The quantization backend the policy plans for must be one the export format ships and the heal
        can update; refused at load time, not after the evaluations."""
        options = self.policy.options or {}
        bits = options.get("bits") if isinstance(options.get("bits"), dict) else options
        name = bits.get("backend", "bitsandbytes") if isinstance(bits, dict) else "bitsandbytes"
        from mi_opt.quant import get_backend

        backend = get_backend(name)
        if self.export.enabled and name != "bitsandbytes" and self.export.format not in backend.export_formats:
            raise MiOptError(f"policy backend {name} is shipped as export.format {' or '.join(backend.export_formats)}, "
                             f"not {self.export.format}")
        if name == "gguf" and self.export.format == "gguf":
            from mi_opt.quant import QuantOptions

            bad = backend.written_mismatch(self.export.gguf_options().mapping(),
                                           set(backend.formats) - {8},  # Q8_0 is the only 8-bit type
                                           QuantOptions(bits.get("quant_type") or backend.formats[4][0]))
            if bad:
                width, measured, written = bad
                what = "policy quant_type" if width == 4 else f"the {width}-bit type"
                raise MiOptError(f"{what} {measured} (what the planner measures {width}-bit damage with) but "
                                 f"export.gguf.types writes {width}-bit as {written}: give both the same GGML type")
        if self.heal and name != "bitsandbytes":
            raise MiOptError(f"heal with quantization backend {name} is not supported yet: healing re-quantizes "
                             "bitsandbytes modules only; drop heal or plan for bitsandbytes")

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def section_dict(self, *names: str) -> dict:
        d = self.to_dict()
        return {n: d[n] for n in names}


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def check_plugins(recipe: Recipe) -> None:
    """Scorer and planner names and options, checked against their registries."""
    from mi_opt.policy import PLANNERS
    from mi_opt.policy.base import parse_config
    from mi_opt.profile.scorers import SCORERS

    try:
        SCORERS.get(recipe.profile.scorer).make_config(recipe.profile.options)
    except MiOptError as err:
        raise MiOptError(f"profile.options: {err}") from None
    try:
        parse_config(PLANNERS.get(recipe.policy.planner).config_cls, recipe.policy.options)
    except MiOptError as err:
        raise MiOptError(f"policy.options: {err}") from None
    except TypeError as err:
        raise MiOptError(f"policy.options: {err}") from None


# --- strict construction from plain data ------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, path)
            except MiOptError as err:
                errors.append(str(err))
        raise MiOptError(errors[0])
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise MiOptError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise MiOptError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise MiOptError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type, data: Any, path: str = ""):
    """Build dataclass `cls` from plain data: unknown keys, wrong types and bad values name their path."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MiOptError(f"{path or 'recipe'}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise MiOptError(f"unknown key {where}{unknown[0]}; allowed keys{' in ' + path if path else ''}: "
                         f"{', '.join(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise MiOptError(f"{path or 'recipe'}: missing required key {missing[0]!r}")
    try:
        return cls(**kwargs)
    except MiOptError as err:
        if path and not str(err).startswith(path):
            raise MiOptError(f"{path}: {err}") from None
        raise


def recipe_from_dict(data: dict) -> Recipe:
    return build(Recipe, data)


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice (plain YAML keeps the last one, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool, type(None))):
                continue  # an unhashable key: SafeLoader's own check names it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise MiOptError(f"recipe {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as err:
        raise MiOptError(f"recipe {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise MiOptError(f"recipe {path} is not valid YAML: {' '.join(str(err).split())}") from None
    try:
        return recipe_from_dict(data)
    except MiOptError as err:
        raise MiOptError(f"{path}: {err}") from None


__all__ = ["Recipe", "ModelSection", "DataSection", "ProfileSection", "PolicySection", "ExportSection",
           "EvalConfig", "SpeedConfig", "HealConfig", "load_recipe", "recipe_from_dict", "build"]
