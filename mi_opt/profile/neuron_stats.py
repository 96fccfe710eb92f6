"""Cheap scores for MLP neuron groups from one forward pass: activation statistics and Wanda.

Both read each neuron's activation where exact ablation removes it: the input of the MLP's
output projection (the adapter's mlp_output_projection), one column per neuron.

- activation (Minitron, Muralidharan et al. 2024): mean |x_j| over every calibration token.
- wanda (Sun et al. 2024, structured): Wanda scores a weight W_ij by |W_ij| * ||x_j||_2, x_j
  being the input feature it multiplies. Every weight of neuron j's output column multiplies
  the same feature, its activation, so the column's Wanda sum is ||x_j||_2 * sum_i |W_out[i, j]|:
  what the neuron writes into the residual stream, weighted by how much it fires. That is
  the default, because it is the neuron's own contribution; its input rows (gate/up rows j)
  multiply the residual features h_k instead, and how strongly they drive the neuron is
  already in ||x_j||. `input_rows=True` adds those rows' own Wanda terms too,
  sum_k |W_in[j, k]| * ||h_k||_2 per input projection (the score of pruning every weight of
  the neuron, as unstructured Wanda would sum it); the neuron benchmark measures both.
  ||.||_2 is taken as the root mean square over tokens (the norm / sqrt(tokens)): the same
  ranking for a fixed calibration set, and a number that does not grow with its size.

A group's score is the sum over its neurons. Scores go under delta_loss (higher = more
important); kl is None: nothing here measures a KL. Standard errors are across calibration
batches (each batch's own statistic); the score itself is computed from every token at once.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from mi_opt.arch import ArchAdapter
from mi_opt.errors import MiOptError
from mi_opt.handle import as_loaded, model_summary
from mi_opt.hooks import Hook, attached
from mi_opt.profile.engine import calibration_batches, mean_and_se
from mi_opt.profile.importance import ImportanceProfile, UnitScore
from mi_opt.units import NEURON_GROUP, Unit, enumerate_units


def _check(batch_size: int, neuron_group: int, unit_kinds, scorer: str) -> tuple[str, ...]:
    kinds = tuple(unit_kinds)
    if kinds != ("neurons",):
        raise MiOptError(f"{scorer} scores MLP neuron groups only: unit_kinds must be ('neurons',), got {kinds}")
    if batch_size < 1 or neuron_group < 1:
        raise MiOptError(f"batch_size and neuron_group must be >= 1, got {batch_size} and {neuron_group}")
    return kinds


@dataclass
class ActivationConfig:
    batch_size: int = 4                       # windows per forward; also the SE granularity
    neuron_group: int = NEURON_GROUP          # consecutive neurons per unit
    unit_kinds: tuple[str, ...] = ("neurons",)  # defined for MLP neurons only

    def __post_init__(self):
        self.unit_kinds = _check(self.batch_size, self.neuron_group, self.unit_kinds, "activation")


@dataclass
class WandaConfig:
    batch_size: int = 4
    neuron_group: int = NEURON_GROUP
    input_rows: bool = False                  # also the input projections' rows (see the module docstring)
    unit_kinds: tuple[str, ...] = ("neurons",)

    def __post_init__(self):
        self.unit_kinds = _check(self.batch_size, self.neuron_group, self.unit_kinds, "wanda")


class _Moments:
    """Per layer, float64 sums over tokens of |x| and x^2 at each neuron (and of h^2 at the MLP input)."""

    def __init__(self, adapter: ArchAdapter, inputs: bool):
        self.adapter, self.inputs = adapter, inputs
        self.abs: dict[int, torch.Tensor] = {}
        self.sq: dict[int, torch.Tensor] = {}
        self.in_sq: dict[int, torch.Tensor] = {}
        self.tokens = 0

    def hooks(self) -> list[Hook]:
        hooks = []
        for i, layer in enumerate(self.adapter.layers()):
            hooks.append(Hook(self.adapter.mlp_output_projection(layer), self._neurons(i), kind="forward_pre"))
            if self.inputs:
                hooks.append(Hook(self.adapter.mlp(layer), self._inputs(i), kind="forward_pre"))
        return hooks

    def _neurons(self, i):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            self.abs[i] = x.abs().sum(0).cpu()
            self.sq[i] = x.square().sum(0).cpu()
            if i == 0:
                self.tokens = x.shape[0]
        return fn

    def _inputs(self, i):
        def fn(module, args):
            h = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            self.in_sq[i] = h.square().sum(0).cpu()
        return fn


def _measure(adapter: ArchAdapter, batches: list[torch.Tensor], inputs: bool, desc: str, progress: bool
             ) -> list[_Moments]:
    """One decoder forward per batch (no lm_head: no logits needed), its moments kept per batch."""
    per_batch = []
    with torch.inference_mode():
        for ids in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            moments = _Moments(adapter, inputs)
            with attached(moments.hooks()):
                adapter.decoder()(ids, use_cache=False)
            per_batch.append(moments)
    return per_batch


def _total(per_batch: list[_Moments]) -> _Moments:
    total = _Moments(per_batch[0].adapter, per_batch[0].inputs)
    for name in ("abs", "sq", "in_sq"):
        for i in getattr(per_batch[0], name):
            getattr(total, name)[i] = sum(getattr(m, name)[i] for m in per_batch)
    total.tokens = sum(m.tokens for m in per_batch)
    return total


def _activation(m: _Moments, layer: int) -> torch.Tensor:
    return m.abs[layer] / m.tokens


def _wanda(adapter: ArchAdapter, m: _Moments, layer: int, input_rows: bool) -> torch.Tensor:
    block = adapter.layers()[layer]
    rms = (m.sq[layer] / m.tokens).sqrt()
    out_w = adapter.as_linear(adapter.mlp_output_projection(block)).weight.detach().double().cpu()  # [hidden, width]
    score = rms * out_w.abs().sum(0)
    if input_rows:
        h_rms = (m.in_sq[layer] / m.tokens).sqrt()
        for proj in adapter.mlp_input_projections(block):
            score = score + adapter.as_linear(proj).weight.detach().double().cpu().abs() @ h_rms  # [width, hidden] @ [hidden]
    return score


def _group_scores(units: list[Unit], total: dict[int, torch.Tensor], per_batch: list[dict[int, torch.Tensor]]
                  ) -> dict[str, UnitScore]:
    scores = {}
    for u in units:
        value = total[u.layer][u.index:u.stop].sum().item()
        _, se = mean_and_se([b[u.layer][u.index:u.stop].sum().item() for b in per_batch])
        scores[u.key] = UnitScore(delta_loss=value, delta_loss_se=se)  # kl None: no KL is measured
    return scores


def _profile(name: str, per_neuron, config, loaded, windows: torch.Tensor, calibration: dict | None,
             model_spec: str | None, progress: bool, meaning: str, inputs: bool = False) -> ImportanceProfile:
    model, adapter = loaded.model, loaded.adapter
    units = enumerate_units(adapter, config.unit_kinds, config.neuron_group)
    batches = calibration_batches(windows, config.batch_size, adapter.input_device())
    started = time.perf_counter()
    per_batch = _measure(adapter, batches, inputs, name, progress)
    total = _total(per_batch)
    layers = sorted({u.layer for u in units})
    scores = _group_scores(units, {i: per_neuron(total, i) for i in layers},
                           [{i: per_neuron(m, i) for i in layers} for m in per_batch])
    cost = {"wall_time_s": round(time.perf_counter() - started, 3), "forwards": len(batches), "backwards": 0,
            "n_units": len(units), "logits": False}
    return ImportanceProfile(
        model=model_summary(loaded, adapter, model_spec),
        method={"scorer": name, **asdict(config), "score_meaning": meaning,
                "metrics": {"delta_loss": "the score (not a loss change); kl: not measured"}},
        calibration={**(calibration or {}), "n_samples": len(windows), "seq_len": windows.shape[1],
                     "n_batches": len(batches)},
        base_loss=None, scores=scores, cost=cost)


def profile_activation(model, windows: torch.Tensor, config: ActivationConfig | None = None,
                       calibration: dict | None = None, model_spec: str | None = None,
                       progress: bool = True) -> ImportanceProfile:
    """Minitron's activation importance of every neuron group on `windows` (n_samples x seq_len)."""
    config = config or ActivationConfig()
    return _profile("activation", _activation, config, as_loaded(model, model_spec), windows, calibration,
                    model_spec, progress, "sum over the group's neurons of mean |activation| over calibration tokens "
                    "at the MLP output projection's input (Minitron); higher = more important")


def profile_wanda(model, windows: torch.Tensor, config: WandaConfig | None = None,
                  calibration: dict | None = None, model_spec: str | None = None,
                  progress: bool = True) -> ImportanceProfile:
    """Structured Wanda score of every neuron group on `windows` (n_samples x seq_len)."""
    config = config or WandaConfig()
    loaded = as_loaded(model, model_spec)
    rows = (" + sum_k |W_in[j,k]| * rms(h_k) over the input projections' rows" if config.input_rows else "")
    return _profile("wanda", lambda m, i: _wanda(loaded.adapter, m, i, config.input_rows), config, loaded, windows,
                    calibration, model_spec, progress,
                    f"sum over the group's neurons j of rms(x_j) * sum_i |W_out[i,j]|{rows} (structured Wanda, "
                    "x_j the activation at the MLP output projection's input); higher = more important",
                    inputs=config.input_rows)
