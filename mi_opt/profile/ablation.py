"""Causal ablation profiling: the damage each unit's removal does to next-token prediction.

Two engines compute the same numbers:
- `naive`: one full model forward per unit and batch, full logits, textbook formulas.
- `fast`: one clean forward per batch caches the residual stream entering every layer and
  the kwargs each layer received; ablating a unit in layer L then reruns only layers >= L,
  several ablations share one forward (batch rows), and logits are reduced chunk by chunk
  to per-token loss and KL without ever holding the full-vocabulary tensor of a forward.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mi_opt.arch import ArchAdapter, get_adapter
from mi_opt.artifacts import model_fingerprint
from mi_opt.errors import MiOptError
from mi_opt.hooks import Hook, attached
from mi_opt.profile.finite import check_batches
from mi_opt.profile.importance import ImportanceProfile, UnitScore
from mi_opt.profile.interventions import ABLATIONS, MeanActivations, ablation_hooks, mean_collection_hooks
from mi_opt.units import KINDS, Unit, enumerate_units

ENGINES = ("fast", "naive")


@dataclass
class AblationConfig:
    ablation: str = "zero"                 # "zero" or "mean" (mean over calibration tokens)
    unit_kinds: tuple[str, ...] = KINDS    # which units to score
    batch_size: int = 4                    # calibration windows per forward; also the SE granularity
    ablations_per_forward: int = 2         # fast engine: ablations stacked along the batch dimension
    logit_chunk_tokens: int = 2048         # fast engine: tokens per chunk of the vocabulary projection
    engine: str = "fast"
    # fast engine: MiB allowed for the cached residual stream of one batch (None: no limit).
    # Over budget, only every s-th layer's input is kept and ablations rerun from the nearest
    # cached layer below: same scores, more compute, bounded memory for long contexts/big models.
    cache_budget_mb: float | None = None

    def __post_init__(self):
        if self.ablation not in ABLATIONS:
            raise MiOptError(f"ablation must be one of {ABLATIONS}, got {self.ablation!r}")
        if self.engine not in ENGINES:
            raise MiOptError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if min(self.batch_size, self.ablations_per_forward, self.logit_chunk_tokens) < 1:
            raise MiOptError("batch_size, ablations_per_forward and logit_chunk_tokens must be >= 1")
        if self.cache_budget_mb is not None and self.cache_budget_mb <= 0:
            raise MiOptError(f"cache_budget_mb must be > 0 (or None for no limit), got {self.cache_budget_mb}")
        self.unit_kinds = tuple(self.unit_kinds)


# --- shared pieces ----------------------------------------------------------------
def collect_means(model, adapter: ArchAdapter, batches: list[torch.Tensor]) -> MeanActivations:
    sums: dict = {}
    counts: dict = {}
    with torch.inference_mode(), attached(mean_collection_hooks(adapter, sums, counts)):
        for ids in tqdm(batches, desc="mean activations", leave=False):
            model(ids, use_cache=False)
    return MeanActivations({k: (sums[k] / counts[k]).float() for k in sums})


def _mean_and_se(values: list[float]) -> tuple[float, float | None]:
    t = torch.tensor(values, dtype=torch.float64)
    se = (t.std(unbiased=True) / len(values) ** 0.5).item() if len(values) > 1 else None
    return t.mean().item(), se


def _summarize(per_batch: dict[str, dict[str, list[float]]]) -> dict[str, UnitScore]:
    out = {}
    for key, m in per_batch.items():
        dl, dl_se = _mean_and_se(m["delta_loss"])
        kl, kl_se = _mean_and_se(m["kl"])
        out[key] = UnitScore(delta_loss=dl, delta_loss_se=dl_se, kl=kl, kl_se=kl_se)
    return out


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
class LayerInputs:
    """The residual stream entering each layer and the extra args each layer was called with."""

    def __init__(self, adapter: ArchAdapter, stride: int = 1):
        self.adapter, self.stride = adapter, stride
        self.hidden: list[torch.Tensor | None] = [None] * adapter.n_layers()
        self.extra: list[tuple[tuple, dict] | None] = [None] * adapter.n_layers()
        self.final: torch.Tensor | None = None

    def hooks(self) -> list[Hook]:
        def capture(i):
            def fn(module, args, kwargs):
                if args:
                    hidden, self.extra[i] = args[0], (args[1:], kwargs)
                else:
                    rest = dict(kwargs)
                    hidden = rest.pop("hidden_states")
                    self.extra[i] = ((), rest)
                if i % self.stride == 0:  # other layers are recomputed from the one below
                    self.hidden[i] = hidden
            return fn

        def capture_final(module, args, output):
            self.final = output[0] if isinstance(output, tuple) else output

        layers = self.adapter.layers()
        hooks = [Hook(layer, capture(i), kind="forward_pre", with_kwargs=True) for i, layer in enumerate(layers)]
        return hooks + [Hook(layers[-1], capture_final)]


def _repeat_rows(obj, batch: int, times: int):
    """Repeat every tensor whose first dim is the batch, so k ablations share one forward."""
    if times == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.repeat(times, *[1] * (obj.dim() - 1)) if obj.dim() and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_repeat_rows(o, batch, times) for o in obj)
    if isinstance(obj, dict):
        return {k: _repeat_rows(v, batch, times) for k, v in obj.items()}
    return obj


def _resident_params(module: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A linear module's weight and bias with real values: under accelerate offload the
    module holds "meta" placeholders and the values sit in its hook's weights_map.
    (None, None) when they cannot be found (then the caller keeps full probabilities)."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is None:
        return None, None
    if weight.device.type != "meta":
        return weight, bias
    weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights_map is None:
        return None, None
    try:
        return weights_map["weight"], (weights_map["bias"] if bias is not None else None)
    except KeyError:
        return None, None


class _CleanReference:
    """What scoring one batch needs from the clean run, without its full-vocabulary tensors.

    KL(p||q) = sum p log p - sum p z + lse(z) for ablated logits z. With z = W n (a linear
    lm_head), sum_v p_v z_v = (p W) . n, so the clean distribution is folded once into one
    hidden-sized vector per token (`p_w`), and scoring an ablation needs only the logits'
    logsumexp and target entry. Softcapped heads (Gemma 2) keep the full probabilities.
    """

    def __init__(self, adapter: ArchAdapter, final_hidden: torch.Tensor, ids: torch.Tensor, chunk: int):
        logits = adapter.logits(final_hidden[:, :-1]).float()
        logp = F.log_softmax(logits, dim=-1)
        del logits
        self.targets = ids[:, 1:].to(logp.device)  # logits live on the lm_head's device
        probs = logp.exp()
        self.neg_entropy = (probs * logp).sum(-1)               # sum_v p log p
        # sum_v p_v is 1 only within fp32 error (~1e-5); weighting lse by it keeps that error
        # (times an lse of ~30 nats) out of every KL: exactly sum p (log p - log q) then.
        self.mass = probs.sum(-1)
        self.nll = -logp.gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)
        del logp
        self.adapter, self.chunk = adapter, chunk
        head = adapter.lm_head()
        weight, bias = _resident_params(head)
        self.linear = (type(head) is torch.nn.Linear and weight is not None
                       and not getattr(adapter.config, "final_logit_softcapping", None))
        if self.linear:
            self.p_w = probs @ weight.to(probs.device).float()
            self.p_b = probs @ bias.to(probs.device).float() if bias is not None else 0.0
            self.probs = None
        else:
            self.probs = probs

    def _chunk_stats(self, h: torch.Tensor, src: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if self.linear:
            normed = self.adapter.final_norm()(h)
            logits = self.adapter.lm_head()(normed).float()
            p_dot_z = (normed.float() * self.p_w[src].to(normed.device)).sum(-1)
            p_dot_z = p_dot_z.to(logits.device) + (self.p_b[src] if torch.is_tensor(self.p_b) else 0.0)
        else:
            logits = self.adapter.logits(h).float()
            p_dot_z = (self.probs[src] * logits).sum(-1)
        lse = torch.logsumexp(logits, dim=-1)
        nll = lse - logits.gather(-1, self.targets[src].unsqueeze(-1)).squeeze(-1)
        kl = self.neg_entropy[src] - p_dot_z + self.mass[src] * lse
        return nll.mean(-1), kl.mean(-1)

    def score(self, final_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean NLL and mean KL(clean || ablated) per row of `final_hidden` (k*B rows)."""
        batch, tokens = self.targets.shape
        step = max(1, self.chunk // tokens)
        nll_rows, kl_rows = [], []
        for block in range(0, final_hidden.shape[0], batch):  # one block of rows per ablation
            for r0 in range(0, batch, step):
                r1 = min(r0 + step, batch)
                nll, kl = self._chunk_stats(final_hidden[block + r0:block + r1, :-1], slice(r0, r1))
                nll_rows.append(nll)
                kl_rows.append(kl)
        return torch.cat(nll_rows), torch.cat(kl_rows)


def run_layers(adapter: ArchAdapter, start: int, hidden: torch.Tensor, inputs: LayerInputs,
               batch: int, times: int = 1, stop: int | None = None) -> torch.Tensor:
    """Layers start..stop-1 (default: to the end) replayed on `hidden` with the recorded extra
    args; `times` copies of the batch stacked along dim 0 share the recorded masks."""
    layers = adapter.layers()
    for i in range(start, len(layers) if stop is None else stop):
        args, kwargs = inputs.extra[i]
        out = layers[i](hidden, *_repeat_rows(args, batch, times), **_repeat_rows(kwargs, batch, times))
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _cache_stride(adapter: ArchAdapter, batch: torch.Tensor, budget_mb: float | None) -> int:
    """Keep every s-th layer input so the residual cache of one batch fits `budget_mb`."""
    if budget_mb is None:
        return 1
    param = next(adapter.layers()[0].parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    per_layer_mb = batch.numel() * adapter.config.hidden_size * dtype.itemsize / 2**20
    cached_layers = max(1, int(budget_mb // per_layer_mb))
    return -(-adapter.n_layers() // cached_layers)


def _fast(model, adapter, units, batches, config, means, bar) -> tuple[dict, float, dict]:
    per_batch = {u.key: {"delta_loss": [], "kl": []} for u in units}
    by_layer: dict[int, list[Unit]] = {}
    for u in units:
        by_layer.setdefault(u.layer, []).append(u)
    n_layers, k_max = adapter.n_layers(), config.ablations_per_forward
    base_losses, layer_rows = [], 0
    stride = _cache_stride(adapter, batches[0], config.cache_budget_mb)
    for ids in batches:
        inputs = LayerInputs(adapter, stride)
        with attached(inputs.hooks()):
            adapter.decoder()(ids, use_cache=False)
        batch = ids.shape[0]
        clean = _CleanReference(adapter, inputs.final, ids, config.logit_chunk_tokens)
        base_losses.append(clean.nll.mean().item())
        layer_rows += n_layers * batch
        for layer, layer_units in by_layer.items():
            for g in range(0, len(layer_units), k_max):
                group = layer_units[g:g + k_max]
                hooks = [h for j, u in enumerate(group) for h in ablation_hooks(
                    adapter, u, config.ablation, means, rows=slice(j * batch, (j + 1) * batch))]
                start = layer - layer % stride
                cached = inputs.hidden[start]
                start_hidden = cached.repeat(len(group), *[1] * (cached.dim() - 1))
                with attached(hooks):
                    final = run_layers(adapter, start, start_hidden, inputs, batch, len(group))
                nll, kl = clean.score(final)
                layer_rows += (n_layers - start) * batch * len(group)
                for j, u in enumerate(group):
                    rows = slice(j * batch, (j + 1) * batch)
                    per_batch[u.key]["delta_loss"].append((nll[rows].mean() - clean.nll.mean()).item())
                    per_batch[u.key]["kl"].append(kl[rows].mean().item())
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
    adapter = get_adapter(model)
    all_units = enumerate_units(adapter, config.unit_kinds)
    if units is not None:
        known = {u.key: u for u in all_units}
        unknown = [k for k in units if k not in known]
        if unknown:
            raise MiOptError(f"units {unknown[:5]} are not among this model's {config.unit_kinds} units")
        all_units = [known[k] for k in units]
    units = all_units
    device = input_device(model, adapter)
    batches = [windows[i:i + config.batch_size].to(device) for i in range(0, len(windows), config.batch_size)]
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
        model=model_summary(model, adapter, model_spec),
        method={"scorer": "ablation", **asdict(config),
                "metrics": {"delta_loss": "increase of mean next-token NLL (nats)",
                            "kl": "mean KL(clean || ablated) of next-token distributions (nats)"}},
        calibration={**(calibration or {}), "n_samples": len(windows), "seq_len": windows.shape[1],
                     "n_batches": len(batches)},
        base_loss=base_loss, scores=_summarize(per_batch), cost=cost)


def input_device(model, adapter: ArchAdapter) -> torch.device:
    """Where token ids go: the embedding's execution device under accelerate dispatch
    (its weights may sit on "meta" while offloaded), else the embedding weight's device."""
    embedding = adapter.embedding()
    hook = getattr(embedding, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return embedding.weight.device


def model_summary(model, adapter: ArchAdapter, spec: str | None) -> dict:
    heads = adapter.heads_per_layer()
    return {"spec": spec, "fingerprint": model_fingerprint(model), "model_type": model.config.model_type,
            "family": adapter.family, "n_layers": adapter.n_layers(),
            "heads": heads,
            "kv_heads": [adapter.heads(i).n_kv_heads if n else 0 for i, n in enumerate(heads)],
            "parameters": sum(p.numel() for p in model.parameters())}
