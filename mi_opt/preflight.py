"""What a recipe refers to, checked without loading a model: `mi-opt validate`'s second half.

Loading a recipe (recipe.py) checks its keys, types and plug-in options. This checks that the
things it names exist: the model (an installed bundled name, a folder with config.json, a
.gguf file, or a hub id), every text source, every evaluation task, and, when the model's
config.json is on disk, that the budget is possible for its layer and head counts. A mistake
found here would otherwise surface only after minutes of profiling and planning.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mi_opt.errors import MiOptError
from mi_opt.recipe import PolicySection, Recipe


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_heads: int       # query heads per layer
    n_kv_heads: int


def check_recipe(recipe: Recipe, trust_task_code: bool = False) -> ModelShape | None:
    """Raise MiOptError naming the recipe key of the first thing that does not resolve; returns
    the model's shape when its config.json is on disk (and budgets were checked against it)."""
    from mi_opt.data import check_source
    from mi_opt.evaluate.tasks import resolve_tasks
    from mi_opt.models import check_model_spec

    config = _under("model.name", check_model_spec, recipe.model.name)
    _under("data.calibration", check_source, recipe.data.calibration)
    if recipe.heal is not None:
        _under("heal.source", check_source, recipe.heal.source)
    if "perplexity" in recipe.evaluate.parts:
        _under("evaluate.text_source", check_source, recipe.evaluate.text_source)
    if "tasks" in recipe.evaluate.parts:
        _under("evaluate.tasks", resolve_tasks, recipe.evaluate.tasks, trust_task_code)
    if config is None:
        return None
    shape = _under("model.name", read_shape, config)
    check_budget(recipe.policy, shape)
    return shape


def _under(key: str, check: Callable, *args):
    """check(*args), with the recipe key it checked in front of any error."""
    try:
        return check(*args)
    except MiOptError as err:
        raise MiOptError(f"{key}: {err}") from None


def read_shape(config_path: Path) -> ModelShape:
    """Layer and head counts from a model's config.json (Llama-style or GPT-2 keys)."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MiOptError(f"{config_path} is not valid JSON ({err}); re-export the model") from None
    text = config.get("text_config") or config  # multimodal configs keep the decoder's counts here
    n_layers = text.get("num_hidden_layers", text.get("n_layer"))
    n_heads = text.get("num_attention_heads", text.get("n_head"))
    if not isinstance(n_layers, int) or not isinstance(n_heads, int):
        raise MiOptError(f"{config_path} gives no layer and head counts (num_hidden_layers, num_attention_heads)")
    return ModelShape(n_layers, n_heads, text.get("num_key_value_heads") or n_heads)


def check_budget(policy: PolicySection, shape: ModelShape) -> None:
    """Budgets no plan can meet for this shape. Parameter and latency budgets need the model
    itself and are left to the planner."""
    from mi_opt.policy.base import parse_config
    from mi_opt.policy.head_prune import HeadPruneConfig
    from mi_opt.policy.layer_skip import LayerSkipConfig

    options = policy.options
    if policy.planner == "layer-skip":
        _check_layer_skip(parse_config(LayerSkipConfig, options), shape, "policy.options")
    elif policy.planner == "head-prune":
        _check_head_prune(parse_config(HeadPruneConfig, options), shape, shape.n_layers, "policy.options")
    elif policy.planner == "combined":
        n_drop = 0
        if options.get("layer_skip"):
            layer_skip = parse_config(LayerSkipConfig, options["layer_skip"])
            _check_layer_skip(layer_skip, shape, "policy.options.layer_skip")
            n_drop = layer_skip.n_drop or 0
        if options.get("head_prune"):
            _check_head_prune(parse_config(HeadPruneConfig, options["head_prune"]), shape,
                              shape.n_layers - n_drop, "policy.options.head_prune")


def _check_layer_skip(config, shape: ModelShape, key: str) -> None:
    if config.n_drop is None:
        return
    if config.n_drop >= shape.n_layers:
        raise MiOptError(f"{key}.n_drop: {config.n_drop} would drop every one of the model's {shape.n_layers} "
                         f"layers (its config.json); keep at least one")
    droppable = max(0, shape.n_layers - config.protect_first - config.protect_last)
    if config.n_drop > droppable:
        raise MiOptError(f"{key}.n_drop: only {droppable} of the model's {shape.n_layers} layers may be dropped "
                         f"(protect_first={config.protect_first}, protect_last={config.protect_last}); lower "
                         f"n_drop or protect fewer layers")


def _check_head_prune(config, shape: ModelShape, n_layers: int, key: str) -> None:
    """The planner's own limits (policy/head_prune.py choose_heads), from head counts alone."""
    layers = n_layers - len({i for i in config.protect_layers if 0 <= i < shape.n_layers})
    budget = "fraction" if config.fraction is not None else "n_heads"
    if layers < 1:
        raise MiOptError(f"{key}.protect_layers: no layer is left to prune heads from")
    total = layers * shape.n_heads
    n_remove = round(config.fraction * total) if config.fraction is not None else config.n_heads
    if n_remove > total - layers:
        raise MiOptError(f"{key}.{budget}: removing {n_remove} of {total} heads would leave a layer with none "
                         f"(the model has {shape.n_heads} per layer); at most {total - layers} can go")
    if config.mode != "uniform" or n_remove == 0:
        return
    if n_remove % layers:
        raise MiOptError(f"{key}.{budget}: uniform pruning removes the same number of heads from each of the "
                         f"{layers} layers; {n_remove} heads is not a multiple of {layers} (or use mode: free)")
    group = shape.n_heads // shape.n_kv_heads
    keepable = {g * k for g in range(1, group + 1) for k in range(1, shape.n_kv_heads + 1)}
    if shape.n_heads - n_remove // layers not in keepable:
        removable = sorted(shape.n_heads - kept for kept in keepable)
        raise MiOptError(f"{key}.{budget}: uniform pruning cannot leave {shape.n_heads - n_remove // layers} heads "
                         f"per layer with {shape.n_kv_heads} KV heads; heads removable per layer: {removable}")
