"""Attribution patching: a first-order estimate of every unit's ablation effect.

One forward and one backward pass per calibration batch score every unit at once. For a
unit whose ablation moves the activation `a` at its ablation point from `a_clean` to
`a_ablated` (the same points and replacement values as mi_opt/profile/interventions.py:
block output -> block input (+ mean residual update), sublayer output -> 0 or its mean,
a head's slice of the head-output projection's input -> 0 or its mean, a KV group = the
sum over its query heads, a neuron group's columns of the MLP output projection's input -> 0
or their means, the sum over its neurons), the change of a metric M is estimated as

    dM  ~=  grad_a M(a_clean) . (a_ablated - a_clean)        summed over batch and tokens.

Metrics:
- delta_loss: M = mean next-token NLL of the batch, the quantity the ablation profiler
  reports as delta_loss; the estimate is signed, like the exact value.
- kl: KL(clean || ablated) has value and gradient zero at the clean point, so its first
  order term is always zero. We use the second-order (Fisher) expansion of KL fed with the
  first-order change of the logits, KL_t ~= 1/2 Var_{y ~ p_t}[d log p_t(y)], and estimate the
  sum over tokens without one backward per token by the Hutchinson trick: draw y_t ~ p_t
  (clean model) and random signs r_t, backpropagate S = sum_t r_t log p_t(y_t), then
  (grad S . diff)^2 / (2 N) is an unbiased estimate of the mean (second-order) KL over the
  N predicted tokens. Each draw costs one more backward pass (`kl_samples`); it is noisy,
  and the per-batch spread shows up in kl_se.

First-order estimates are known to be poor where an ablation is large and the model is
far from linear in it: whole layers and the residual stream (the block-skip ablation
moves the whole residual stream), and units whose removal saturates the softmax. The
profile's method["notes"] says so; prefer exact ablation for those units. For MLP neuron
groups, RelP (Jafari et al. 2025) found attribution tracks ablation of MLP outputs poorly on
GPT-2 small (Pearson 0.2); benchmarks/neuron_scorers.py measures it against exact group
ablation on SmolLM2 (reports/neuron_scorers.md).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mi_opt.arch import ArchAdapter
from mi_opt.errors import MiOptError
from mi_opt.hooks import Hook, attached
from mi_opt.handle import as_loaded, model_summary
from mi_opt.profile.engine import calibration_batches, collect_means, summarize
from mi_opt.profile.finite import check_base_loss, check_batches
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.profile.interventions import ABLATIONS, MeanActivations
from mi_opt.units import DEFAULT_KINDS, KINDS, NEURON_GROUP, Unit, enumerate_units

NOTES = ("First-order (gradient x activation difference) estimates of the ablation effect. "
         "Known to be poor for whole layers and anything that moves the residual stream "
         "(the layer ablation replaces the block output by its input), and for units whose "
         "removal is large or saturates the softmax: check those with exact ablation. "
         "kl is the Hutchinson estimate of the second-order (Fisher) KL of the first-order "
         "logit change, with kl_samples random draws per batch; delta_loss is the first-order "
         "change of the mean next-token NLL.")


@dataclass
class AttributionConfig:
    ablation: str = "zero"                 # "zero" or "mean" (mean over calibration tokens)
    unit_kinds: tuple[str, ...] = DEFAULT_KINDS    # which units to score ("neurons" too: see neuron_group)
    batch_size: int = 4                    # calibration windows per forward/backward; also the SE granularity
    neuron_group: int = NEURON_GROUP       # consecutive MLP neurons per "neurons" unit
    kl_samples: int = 1                    # extra backward passes per batch for the KL estimate
    seed: int = 0                          # seeds the KL estimator's token and sign draws

    def __post_init__(self):
        if self.ablation not in ABLATIONS:
            raise MiOptError(f"ablation must be one of {ABLATIONS}, got {self.ablation!r}")
        self.unit_kinds = tuple(self.unit_kinds)
        unknown = set(self.unit_kinds) - set(KINDS)
        if unknown or not self.unit_kinds:
            raise MiOptError(f"unit_kinds must be a non-empty subset of {KINDS}, got {self.unit_kinds}")
        if self.batch_size < 1 or self.neuron_group < 1:
            raise MiOptError(f"batch_size and neuron_group must be >= 1, got {self.batch_size}, {self.neuron_group}")
        if self.kl_samples < 1:
            raise MiOptError(f"kl_samples must be >= 1 (each is one backward pass), got {self.kl_samples}")


def _main(output):
    return output[0] if isinstance(output, tuple) else output


class _Activations:
    """Clean activations at every ablation point of one forward, kept in the autograd graph."""

    def __init__(self, adapter: ArchAdapter, kinds: set[str]):
        self.adapter, self.kinds = adapter, kinds
        self.acts: dict[tuple[str, int], torch.Tensor] = {}

    def hooks(self) -> list[Hook]:
        # Gradients must flow even when the weights are frozen: restart the graph at the
        # embedding output, which also spares the backward pass the embedding weights.
        hooks = [Hook(self.adapter.embedding(), lambda m, a, out: out.detach().requires_grad_(True))]
        for i, layer in enumerate(self.adapter.layers()):
            if "layer" in self.kinds:
                hooks.append(Hook(layer, self._block(i), with_kwargs=True))
            if "attn" in self.kinds:
                hooks.append(Hook(self.adapter.attention(layer), self._store("attn", i)))
            if "mlp" in self.kinds:
                hooks.append(Hook(self.adapter.mlp(layer), self._store("mlp", i)))
            if self.kinds & {"head", "kv_group"}:
                hooks.append(Hook(self.adapter.head_output_proj(layer), self._store_input("heads", i),
                                  kind="forward_pre"))
            if "neurons" in self.kinds:
                hooks.append(Hook(self.adapter.mlp_output_projection(layer), self._store_input("neurons", i),
                                  kind="forward_pre"))
        return hooks

    def _block(self, i):
        def fn(module, args, kwargs, output):
            self.acts[("layer_in", i)] = args[0] if args else kwargs["hidden_states"]
            self.acts[("layer", i)] = _main(output)
        return fn

    def _store(self, kind, i):
        def fn(module, args, output):
            self.acts[(kind, i)] = _main(output)
        return fn

    def _store_input(self, kind, i):
        def fn(module, args):
            self.acts[(kind, i)] = args[0]
        return fn

    def grad_keys(self) -> list[tuple[str, int]]:
        return [k for k in self.acts if k[0] != "layer_in"]


def _differences(acts: dict, keys: list, ablation: str, means: MeanActivations | None) -> dict:
    """a_ablated - a_clean at each ablation point (detached), exactly as interventions.py ablates."""
    diffs = {}
    for kind, i in keys:
        clean = acts[(kind, i)].detach()
        if kind == "layer":
            ablated = acts[("layer_in", i)].detach().to(clean.device)  # dispatch: devices may differ
            if ablation == "mean":
                ablated = ablated + means.get("layer", i).to(ablated)
        elif ablation == "mean":
            ablated = means.get(kind, i).to(clean).expand_as(clean)
        else:
            ablated = torch.zeros_like(clean)
        diffs[(kind, i)] = (ablated - clean).double()
    return diffs


def _unit_dots(adapter: ArchAdapter, units: list[Unit], grads: dict, diffs: dict) -> dict[str, float]:
    """grad . diff per unit; head slices and neuron groups come from one product per layer."""
    out, per_head, per_neuron = {}, {}, {}
    for unit in units:
        if unit.kind in ("layer", "attn", "mlp"):
            key = (unit.kind, unit.layer)
            out[unit.key] = (grads[key] * diffs[key]).sum().item()
            continue
        if unit.kind == "neurons":
            if unit.layer not in per_neuron:  # summed over batch and tokens, one value per neuron
                key = ("neurons", unit.layer)
                prod = grads[key] * diffs[key]
                per_neuron[unit.layer] = prod.reshape(-1, prod.shape[-1]).sum(0)
            out[unit.key] = per_neuron[unit.layer][unit.index:unit.stop].sum().item()
            continue
        if unit.layer not in per_head:
            geo = adapter.heads(unit.layer)
            prod = grads[("heads", unit.layer)] * diffs[("heads", unit.layer)]
            per_head[unit.layer] = prod.reshape(-1, geo.n_heads, geo.head_dim).sum((0, 2))
        heads = per_head[unit.layer]
        if unit.kind == "head":
            out[unit.key] = heads[unit.index].item()
        else:
            size = adapter.heads(unit.layer).group_size
            out[unit.key] = heads[unit.index * size:(unit.index + 1) * size].sum().item()
    return out


def _grads(objective: torch.Tensor, acts: dict, keys: list, retain: bool) -> dict:
    tensors = [acts[k] for k in keys]
    grads = torch.autograd.grad(objective, tensors, retain_graph=retain, allow_unused=True)
    return {k: (torch.zeros_like(t) if g is None else g).double() for k, t, g in zip(keys, tensors, grads)}


def profile_attribution(model, windows: torch.Tensor, config: AttributionConfig | None = None,
                        calibration: dict | None = None, model_spec: str | None = None,
                        progress: bool = True) -> ImportanceProfile:
    """Estimate every unit's ablation effect on `windows` (n_samples x seq_len) by attribution patching."""
    config = config or AttributionConfig()
    loaded = as_loaded(model, model_spec)
    model, adapter = loaded.model, loaded.adapter
    units = enumerate_units(adapter, config.unit_kinds, config.neuron_group)
    kinds = {u.kind for u in units}
    batches = calibration_batches(windows, config.batch_size, adapter.input_device())
    generator = None  # made on the logits' device, which differs from the input's under dispatch
    started = time.perf_counter()
    with torch.inference_mode():
        means = collect_means(model, adapter, batches) if config.ablation == "mean" else None
    per_batch = {u.key: {"delta_loss": [], "kl": []} for u in units}
    base_losses = []
    for ids in tqdm(batches, desc="attribution", unit="batch", disable=not progress):
        captured = _Activations(adapter, kinds)
        # A caller's no_grad or inference_mode must not silently turn the estimate off.
        with torch.inference_mode(False), torch.enable_grad():
            with attached(captured.hooks()):
                logp = F.log_softmax(model(ids, use_cache=False).logits[:, :-1].float(), dim=-1)
            targets = ids[:, 1:].to(logp.device)
            nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            loss = nll.mean()
            base_losses.append(loss.item())
            check_base_loss(base_losses[-1], len(base_losses) - 1)  # NaN probabilities cannot even be sampled
            keys = captured.grad_keys()
            diffs = _differences(captured.acts, keys, config.ablation, means)
            loss_dots = _unit_dots(adapter, units, _grads(loss, captured.acts, keys, retain=True), diffs)
            kl_sums = dict.fromkeys(loss_dots, 0.0)
            if generator is None:
                generator = torch.Generator(device=logp.device).manual_seed(config.seed)
            probs = logp.detach().exp().reshape(-1, logp.shape[-1])
            for s in range(config.kl_samples):
                with torch.no_grad():
                    draws = torch.multinomial(probs, 1, generator=generator).reshape(targets.shape)
                    signs = torch.randint(0, 2, targets.shape, generator=generator, device=logp.device) * 2.0 - 1.0
                probe = (signs * logp.gather(-1, draws.unsqueeze(-1)).squeeze(-1)).sum()
                dots = _unit_dots(adapter, units, _grads(probe, captured.acts, keys,
                                                         retain=s < config.kl_samples - 1), diffs)
                for key, dot in dots.items():
                    kl_sums[key] += dot * dot / (2 * nll.numel())
            for key, dot in loss_dots.items():
                per_batch[key]["delta_loss"].append(dot)
                per_batch[key]["kl"].append(kl_sums[key] / config.kl_samples)
        del captured, logp, nll, loss, diffs, probs
    check_batches(per_batch)
    cost = {"wall_time_s": round(time.perf_counter() - started, 3), "n_units": len(units),
            "forwards": len(batches) * (2 if means is not None else 1),
            "backwards": len(batches) * (1 + config.kl_samples)}
    if means is not None:
        cost["mean_pass_forwards"] = len(batches)
    return ImportanceProfile(
        model=model_summary(loaded, adapter, model_spec),
        method={"scorer": "attribution", **asdict(config), "first_order": True, "notes": NOTES,
                "metrics": {"delta_loss": "first-order estimate of the increase of mean next-token NLL (nats)",
                            "kl": "Hutchinson estimate of the second-order KL(clean || ablated) (nats)"},
                "score_meaning": "estimated delta_loss of ablating the unit; higher = more important"},
        calibration={**(calibration or {}), "n_samples": len(windows), "seq_len": windows.shape[1],
                     "n_batches": len(batches)},
        base_loss=sum(base_losses) / len(base_losses), scores=summarize(per_batch), cost=cost)
