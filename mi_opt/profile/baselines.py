"""Baseline scorers from the efficiency literature, in the ImportanceProfile format.

They exist to be compared with causal ablation, so each is computed as its paper defines
it, and stored so that planners can use it unchanged: `delta_loss` holds the scorer's score,
higher = more important for every scorer, so a planner always drops the lowest; `kl` is
None (profile schema v2), since none of them measures a KL. method["score_meaning"] says what the number is.

- block_influence (ShortGPT, Men et al. 2024): 1 - cos(layer input, layer output), the
  mean over every calibration token. A layer that changes its input a lot is important.
- angular_distance (Gromov et al. 2024): arccos(cos(x_l, x_{l+n})) / pi between the
  residual stream entering layer l and leaving layer l+n-1, at the last token of each
  window, averaged over windows. As a per-layer profile n = 1; `angular_distances` and
  `best_block` serve the paper's contiguous-block pruning.
- weight_magnitude: the L2 (or L1) norm of a unit's weights (biases excluded): for a head
  its q_proj rows and head-output-projection columns, for a KV group also its k and v
  rows, for attn/mlp every linear weight of the sublayer, for a layer every linear weight.
- random: seeded uniform scores, the floor any real signal must beat.

Baselines never compute logits, so base_loss is None. Standard errors are across
calibration batches where a score is a mean over data, None where nothing is sampled.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from mi_opt.arch import ArchAdapter, get_adapter
from mi_opt.errors import MiOptError
from mi_opt.handle import as_loaded, model_summary
from mi_opt.profile.engine import LayerInputs, calibration_batches, mean_and_se
from mi_opt.profile.importance import ImportanceProfile, UnitScore
from mi_opt.units import DEFAULT_KINDS, Unit, enumerate_units

NORMS = ("l2", "l1")


def _check_kinds(kinds, allowed: tuple[str, ...], scorer: str) -> tuple[str, ...]:
    kinds = tuple(kinds)
    if not kinds or set(kinds) - set(allowed):
        raise MiOptError(f"{scorer} scores unit kinds {allowed}; got {kinds}")
    return kinds


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise MiOptError(f"batch_size must be >= 1, got {batch_size}")


@dataclass
class BlockInfluenceConfig:
    batch_size: int = 4                      # windows per forward; also the SE granularity
    unit_kinds: tuple[str, ...] = ("layer",)  # ShortGPT defines it for whole layers only

    def __post_init__(self):
        _check_batch(self.batch_size)
        self.unit_kinds = _check_kinds(self.unit_kinds, ("layer",), "block_influence")


@dataclass
class AngularDistanceConfig:
    batch_size: int = 4
    unit_kinds: tuple[str, ...] = ("layer",)  # per-layer profile: blocks of n = 1 layer

    def __post_init__(self):
        _check_batch(self.batch_size)
        self.unit_kinds = _check_kinds(self.unit_kinds, ("layer",), "angular_distance")


@dataclass
class WeightMagnitudeConfig:
    norm: str = "l2"                       # "l2": Frobenius norm; "l1": sum of absolute values
    unit_kinds: tuple[str, ...] = DEFAULT_KINDS

    def __post_init__(self):
        if self.norm not in NORMS:
            raise MiOptError(f"norm must be one of {NORMS}, got {self.norm!r}")
        self.unit_kinds = _check_kinds(self.unit_kinds, DEFAULT_KINDS, "weight_magnitude")


@dataclass
class RandomConfig:
    seed: int = 0
    unit_kinds: tuple[str, ...] = DEFAULT_KINDS

    def __post_init__(self):
        self.unit_kinds = _check_kinds(self.unit_kinds, DEFAULT_KINDS, "random")


# --- the residual stream at layer boundaries ---------------------------------------
def _boundaries(adapter: ArchAdapter, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering each layer, then the last layer's output (before the final norm)."""
    with torch.inference_mode():
        inputs = LayerInputs.record(adapter, ids)  # no lm_head: these scorers never need logits
    return [*inputs.hidden, inputs.final]


def _batches(model, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return calibration_batches(windows, batch_size, get_adapter(model).input_device())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.arccos(_cosine(a, b).clamp(-1.0, 1.0)) / math.pi


def _profile(model, adapter, spec, method: dict, calibration: dict | None, scores: dict[str, UnitScore],
             cost: dict, windows: torch.Tensor | None = None, batch_size: int | None = None) -> ImportanceProfile:
    cal = dict(calibration or {})
    if windows is not None:
        cal.update(n_samples=len(windows), seq_len=windows.shape[1], n_batches=-(-len(windows) // batch_size))
    return ImportanceProfile(model=model_summary(model, adapter, spec), method=method, calibration=cal,
                             base_loss=None, scores=scores, cost=cost)


def _score(values: list[float] | float) -> UnitScore:
    """The score under delta_loss only: a planner asking for kl is told this scorer has none."""
    mean, se = mean_and_se(values) if isinstance(values, list) else (float(values), None)
    return UnitScore(delta_loss=mean, delta_loss_se=se)


# --- block influence and angular distance ------------------------------------------
def profile_block_influence(model, windows: torch.Tensor, config: BlockInfluenceConfig | None = None,
                            calibration: dict | None = None, model_spec: str | None = None,
                            progress: bool = True) -> ImportanceProfile:
    config = config or BlockInfluenceConfig()
    loaded = as_loaded(model, model_spec)
    model, adapter = loaded.model, loaded.adapter
    batches = _batches(model, windows, config.batch_size)
    per_batch: list[list[float]] = [[] for _ in range(adapter.n_layers())]
    started = time.perf_counter()
    for ids in tqdm(batches, desc="block influence", unit="batch", disable=not progress):
        states = _boundaries(adapter, ids)
        for i in range(adapter.n_layers()):
            per_batch[i].append(1.0 - _cosine(states[i], states[i + 1]).mean().item())
    cost = {"wall_time_s": round(time.perf_counter() - started, 3), "forwards": len(batches), "backwards": 0,
            "n_units": adapter.n_layers(), "logits": False}
    method = {"scorer": "block_influence", **asdict(config),
              "score_meaning": "1 - cosine similarity of the layer's input and output hidden states, mean over "
                               "tokens (ShortGPT); higher = the layer changes its input more = more important"}
    scores = {Unit(i, "layer").key: _score(v) for i, v in enumerate(per_batch)}
    return _profile(loaded, adapter, model_spec, method, calibration, scores, cost, windows, config.batch_size)


def angular_distances(model, windows: torch.Tensor, n: int, batch_size: int = 4,
                      progress: bool = True) -> list[list[float]]:
    """Per start layer l (0 .. L-n): per-batch means of arccos(cos(x_l, x_{l+n})) / pi at the last token."""
    adapter = get_adapter(model)
    if not 1 <= n <= adapter.n_layers():
        raise MiOptError(f"block size n must be between 1 and {adapter.n_layers()} layers, got {n}")
    _check_batch(batch_size)
    per_batch: list[list[float]] = [[] for _ in range(adapter.n_layers() - n + 1)]
    for ids in tqdm(_batches(model, windows, batch_size), desc="angular distance", unit="batch",
                    disable=not progress):
        last = [s[:, -1] for s in _boundaries(adapter, ids)]
        for start in range(len(per_batch)):
            per_batch[start].append(_angle(last[start], last[start + n]).mean().item())
    return per_batch


def best_block(model, windows: torch.Tensor, n: int, batch_size: int = 4, progress: bool = True) -> tuple[int, float]:
    """Gromov et al.: the n contiguous layers whose removal changes the residual stream least.

    Returns (first layer of the block, its mean angular distance); drop layers start .. start+n-1.
    """
    means = [mean_and_se(v)[0] for v in angular_distances(model, windows, n, batch_size, progress)]
    start = min(range(len(means)), key=means.__getitem__)
    return start, means[start]


def profile_angular_distance(model, windows: torch.Tensor, config: AngularDistanceConfig | None = None,
                             calibration: dict | None = None, model_spec: str | None = None,
                             progress: bool = True) -> ImportanceProfile:
    config = config or AngularDistanceConfig()
    loaded = as_loaded(model, model_spec)
    model, adapter = loaded.model, loaded.adapter
    started = time.perf_counter()
    per_batch = angular_distances(model, windows, 1, config.batch_size, progress)
    cost = {"wall_time_s": round(time.perf_counter() - started, 3), "n_units": adapter.n_layers(),
            "forwards": -(-len(windows) // config.batch_size), "backwards": 0, "logits": False}
    method = {"scorer": "angular_distance", **asdict(config), "block_size": 1, "position": "last token",
              "score_meaning": "arccos(cos(layer input, layer output)) / pi at the last token, mean over windows "
                               "(Gromov et al., n = 1); higher = more important"}
    scores = {Unit(i, "layer").key: _score(v) for i, v in enumerate(per_batch)}
    return _profile(loaded, adapter, model_spec, method, calibration, scores, cost, windows, config.batch_size)


# --- weight magnitude and random ---------------------------------------------------
def _head_weights(adapter: ArchAdapter, unit: Unit) -> list[torch.Tensor]:
    geo = adapter.heads(unit.layer)
    q, o = adapter.head_projections(unit.layer)
    heads = [unit.index] if unit.kind == "head" else range(unit.index * geo.group_size,
                                                           (unit.index + 1) * geo.group_size)
    parts = []
    for h in heads:
        cols = slice(h * geo.head_dim, (h + 1) * geo.head_dim)
        parts += [q[cols], o[:, cols]]
    if unit.kind == "kv_group":
        k, v = adapter.kv_projections(unit.layer)
        rows = slice(unit.index * geo.head_dim, (unit.index + 1) * geo.head_dim)
        parts += [k[rows], v[rows]]
    return parts


def _unit_weights(adapter: ArchAdapter, unit: Unit) -> list[torch.Tensor]:
    layer = adapter.layers()[unit.layer]
    if unit.kind in ("head", "kv_group"):
        return _head_weights(adapter, unit)
    module = {"layer": layer, "attn": adapter.attention(layer), "mlp": adapter.mlp(layer)}[unit.kind]
    return [m.weight for m in adapter.linear_modules(module).values()]


def weight_norm(weights: list[torch.Tensor], norm: str) -> float:
    if norm == "l1":
        return sum(w.detach().double().abs().sum().item() for w in weights)
    return math.sqrt(sum(w.detach().double().pow(2).sum().item() for w in weights))


def profile_weight_magnitude(model, windows: torch.Tensor | None = None, config: WeightMagnitudeConfig | None = None,
                             calibration: dict | None = None, model_spec: str | None = None,
                             progress: bool = True) -> ImportanceProfile:
    """Data-free: `windows` is accepted for a common signature and ignored."""
    config = config or WeightMagnitudeConfig()
    loaded = as_loaded(model, model_spec)
    model, adapter = loaded.model, loaded.adapter
    started = time.perf_counter()
    units = enumerate_units(adapter, config.unit_kinds)
    scores = {u.key: _score(weight_norm(_unit_weights(adapter, u), config.norm))
              for u in tqdm(units, desc="weight magnitude", unit="unit", disable=not progress)}
    cost = {"wall_time_s": round(time.perf_counter() - started, 3), "forwards": 0, "backwards": 0,
            "n_units": len(units)}
    method = {"scorer": "weight_magnitude", **asdict(config),
              "score_meaning": f"{config.norm.upper()} norm of the unit's weights (heads: q rows and output-"
                               "projection columns; KV groups: also k, v rows; attn/mlp/layer: all linear "
                               "weights; biases excluded); higher = more important"}
    return _profile(loaded, adapter, model_spec, method, calibration, scores, cost)


def profile_random(model, windows: torch.Tensor | None = None, config: RandomConfig | None = None,
                   calibration: dict | None = None, model_spec: str | None = None,
                   progress: bool = True) -> ImportanceProfile:
    """Seeded uniform scores in [0, 1): the floor any real importance signal must beat."""
    config = config or RandomConfig()
    loaded = as_loaded(model, model_spec)
    model, adapter = loaded.model, loaded.adapter
    units = enumerate_units(adapter, config.unit_kinds)
    values = torch.rand(len(units), generator=torch.Generator().manual_seed(config.seed), dtype=torch.float64)
    scores = {u.key: _score(v.item()) for u, v in zip(units, values)}
    method = {"scorer": "random", **asdict(config),
              "score_meaning": "uniform random number in [0, 1) from the seed; no information"}
    cost = {"wall_time_s": 0.0, "forwards": 0, "backwards": 0, "n_units": len(units)}
    return _profile(loaded, adapter, model_spec, method, calibration, scores, cost)
