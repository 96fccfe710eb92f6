"""Causal ablation profiling: the damage each unit's removal does to next-token prediction.

Two engines compute the same numbers:
- `naive`: one full model forward per unit and batch, full logits, textbook formulas.
- `fast`: an ablation hook + a replay through mi_opt/profile/engine.py: one clean forward per
  batch caches the residual stream entering every layer and the kwargs each layer received;
  ablating a unit in layer L then reruns only layers >= L, several ablations share one forward
  (batch rows), and logits are reduced chunk by chunk to per-token loss and KL without ever
  holding the full-vocabulary tensor of a forward.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mi_opt.errors import MiOptError
from mi_opt.handle import as_loaded, model_summary
from mi_opt.hooks import attached
from mi_opt.profile.engine import (CleanReference, LayerInputs, cache_stride, calibration_batches, collect_means,
                                   summarize)
from mi_opt.profile.finite import check_batches
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.profile.interventions import ABLATIONS, ablation_hooks
from mi_opt.units import DEFAULT_KINDS, NEURON_GROUP, Unit, enumerate_units

ENGINES = ("fast", "naive")


@dataclass
class AblationConfig:
    ablation: str = "zero"                 # "zero" or "mean" (mean over calibration tokens)
    unit_kinds: tuple[str, ...] = DEFAULT_KINDS    # which units to score ("neurons" too: see neuron_group)
    batch_size: int = 4                    # calibration windows per forward; also the SE granularity
    neuron_group: int = NEURON_GROUP       # consecutive MLP neurons per "neurons" unit
    # fast engine: ablations stacked along the batch dimension. 1: on SmolLM2 (2 CPU cores) two
    # stacked took 1.05x the time of the same replays in turn (median of 5 interleaved rounds,
    # 1.00-1.15x; benchmarks/stacking.py). A wider device (a GPU) may gain from stacking.
    ablations_per_forward: int = 1
    logit_chunk_tokens: int = 2048         # fast engine: tokens per chunk of the vocabulary projection
    engine: str = "fast"
    # fast engine: MiB allowed for the cached residual stream of one batch (None: no limit).
    # Over budget, only every s-th layer's input is kept and ablations rerun from the nearest
    # cached layer below: same scores, more compute, bounded memory for long contexts/big models.
    # With no limit the heads' outputs of every layer are kept too (about as much again), so a
    # replay skips recomputing the attention of the layer it starts at.
    cache_budget_mb: float | None = None

    def __post_init__(self):
        if self.ablation not in ABLATIONS:
            raise MiOptError(f"ablation must be one of {ABLATIONS}, got {self.ablation!r}")
        if self.engine not in ENGINES:
            raise MiOptError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if min(self.batch_size, self.ablations_per_forward, self.logit_chunk_tokens, self.neuron_group) < 1:
            raise MiOptError("batch_size, ablations_per_forward, logit_chunk_tokens and neuron_group must be >= 1")
        if self.cache_budget_mb is not None and self.cache_budget_mb <= 0:
            raise MiOptError(f"cache_budget_mb must be > 0 (or None for no limit), got {self.cache_budget_mb}")
        self.unit_kinds = tuple(self.unit_kinds)


# --- naive engine -----------------------------------------------------------------
def _naive_token_stats(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = F.log_softmax(model(ids, use_cache=False).logits[:, :-1].float(), dim=-1)
    nll = F.nll_loss(logp.transpose(1, 2), ids[:, 1:].to(logp.device), reduction="none")
    return nll, logp


def _naive(model, adapter, units, batches, config, means, bar) -> tuple[dict, float, dict]:
    per_batch = {u.key: {"delta_loss": [], "kl": []} for u in units}
    base_losses = []
    forwards = 0
    for ids in batches:
        clean_nll, clean_logp = _naive_token_stats(model, ids)
        base_losses.append(clean_nll.mean().item())
        forwards += 1
        for unit in units:
            with attached(ablation_hooks(adapter, unit, config.ablation, means)):
                nll, logp = _naive_token_stats(model, ids)
            kl = F.kl_div(logp, clean_logp, log_target=True, reduction="none").sum(-1)
            per_batch[unit.key]["delta_loss"].append((nll.mean() - clean_nll.mean()).item())
            per_batch[unit.key]["kl"].append(kl.mean().item())
            forwards += 1
            bar.update(1)
    return per_batch, sum(base_losses) / len(base_losses), {"full_forwards": forwards}


# --- fast engine ------------------------------------------------------------------
def _fast(model, adapter, units, batches, config, means, bar) -> tuple[dict, float, dict]:
    per_batch = {u.key: {"delta_loss": [], "kl": []} for u in units}
    by_layer: dict[int, list[Unit]] = {}
    for u in units:
        by_layer.setdefault(u.layer, []).append(u)
    n_layers, k_max = adapter.n_layers(), config.ablations_per_forward
    base_losses, layer_rows = [], 0
    stride = cache_stride(adapter, batches[0], config.cache_budget_mb)
    for ids in batches:
        inputs = LayerInputs.record(adapter, ids, stride, attention=config.cache_budget_mb is None)
        batch = ids.shape[0]
        clean = CleanReference(adapter, inputs.final, ids, config.logit_chunk_tokens)
        base_losses.append(clean.nll.mean().item())
        layer_rows += n_layers * batch
        for layer, layer_units in by_layer.items():
            for g in range(0, len(layer_units), k_max):
                group = layer_units[g:g + k_max]
                hooks = [h for j, u in enumerate(group) for h in ablation_hooks(
                    adapter, u, config.ablation, means, rows=slice(j * batch, (j + 1) * batch))]
                with attached(hooks):
                    final, start = inputs.replay_from(layer, len(group))
                layer_rows += (n_layers - start) * batch * len(group)
                for u, (dl, kl) in zip(group, clean.damage(final, len(group))):
                    per_batch[u.key]["delta_loss"].append(dl)
                    per_batch[u.key]["kl"].append(kl)
                bar.update(len(group))
        del inputs, clean
    cost = {"full_forward_equivalents": layer_rows / (n_layers * batches[0].shape[0]), "cache_stride": stride}
    return per_batch, sum(base_losses) / len(base_losses), cost


# --- entry point ------------------------------------------------------------------
def profile_ablation(model, windows: torch.Tensor, config: AblationConfig | None = None,
                     calibration: dict | None = None, model_spec: str | None = None,
                     progress: bool = True, units: list[str] | None = None) -> ImportanceProfile:
    """Score every unit of `model` by causal ablation on `windows` (n_samples x seq_len).

    units: score only these keys (a subset of config.unit_kinds' units), e.g. one shard of a
    distributed run; every batch is still used, so each unit's score is complete.
    """
    config = config or AblationConfig()
    loaded = as_loaded(model, model_spec)
    model, adapter = loaded.model, loaded.adapter
    all_units = enumerate_units(adapter, config.unit_kinds, config.neuron_group)
    if units is not None:
        known = {u.key: u for u in all_units}
        unknown = [k for k in units if k not in known]
        if unknown:
            raise MiOptError(f"units {unknown[:5]} are not among this model's {config.unit_kinds} units")
        all_units = [known[k] for k in units]
    units = all_units
    batches = calibration_batches(windows, config.batch_size, adapter.input_device())
    started = time.perf_counter()
    with torch.inference_mode():
        means = collect_means(model, adapter, batches) if config.ablation == "mean" else None
        engine = _fast if config.engine == "fast" else _naive
        with tqdm(total=len(units) * len(batches), desc=f"ablating ({config.engine})", unit="unit",
                  disable=not progress) as bar:
            per_batch, base_loss, cost = engine(model, adapter, units, batches, config, means, bar)
    check_batches(per_batch)  # the first batch and unit where NaN or inf appeared, not a NaN profile
    cost["wall_time_s"] = round(time.perf_counter() - started, 3)
    cost["n_units"] = len(units)
    if means is not None:
        cost["mean_pass_forwards"] = len(batches)
    return ImportanceProfile(
        model=model_summary(loaded, adapter, model_spec),
        method={"scorer": "ablation", **asdict(config),
                "metrics": {"delta_loss": "increase of mean next-token NLL (nats)",
                            "kl": "mean KL(clean || ablated) of next-token distributions (nats)"}},
        calibration={**(calibration or {}), "n_samples": len(windows), "seq_len": windows.shape[1],
                     "n_batches": len(batches)},
        base_loss=base_loss, scores=summarize(per_batch), cost=cost)
