"""The replay engine: every causal measurement is "a perturbation + replay" through these parts.

- `calibration_batches`: windows cut into batches on the model's input device.
- `LayerInputs`: one clean forward records the residual stream entering every layer (every
  s-th layer under a memory budget), the extra arguments each layer was called with, and the
  last layer's output.
- `run_layers` / `LayerInputs.replay_from`: rerun layers L.. on a (possibly perturbed) hidden
  state with the recorded arguments; k perturbations stack along the batch dimension.
- `CleanReference`: what scoring a replay needs from the clean run (loss and KL to the clean
  next-token distribution), without keeping its full-vocabulary tensors.
- `mean_and_se`, `summarize`: per-batch values to a mean and its standard error.

Ablation, quantization sensitivity, the baselines and attribution use these names; the heal
stage uses `LayerInputs` and `run_layers` to train one block on recorded inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mi_opt.arch import ArchAdapter
from mi_opt.hooks import Hook, attached
from mi_opt.profile.importance import UnitScore
from mi_opt.profile.interventions import MeanActivations, mean_collection_hooks


# --- batches -------------------------------------------------------------------------
def calibration_batches(windows: torch.Tensor, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """`windows` (n x seq_len) in batches of `batch_size` rows, on `device`."""
    return [windows[i:i + batch_size].to(device) for i in range(0, len(windows), batch_size)]


# --- statistics ----------------------------------------------------------------------
def mean_and_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None from a single value)."""
    t = torch.tensor(values, dtype=torch.float64)
    se = (t.std(unbiased=True) / len(values) ** 0.5).item() if len(values) > 1 else None
    return t.mean().item(), se


def summarize(per_batch: dict[str, dict[str, list[float]]]) -> dict[str, UnitScore]:
    """Per-batch delta_loss and kl of every unit to its UnitScore."""
    out = {}
    for key, m in per_batch.items():
        dl, dl_se = mean_and_se(m["delta_loss"])
        kl, kl_se = mean_and_se(m["kl"])
        out[key] = UnitScore(delta_loss=dl, delta_loss_se=dl_se, kl=kl, kl_se=kl_se)
    return out


def collect_means(model, adapter: ArchAdapter, batches: list[torch.Tensor]) -> MeanActivations:
    """Mean activation of every ablatable site over the calibration tokens (for mean ablation)."""
    sums: dict = {}
    counts: dict = {}
    with torch.inference_mode(), attached(mean_collection_hooks(adapter, sums, counts)):
        for ids in tqdm(batches, desc="mean activations", leave=False):
            model(ids, use_cache=False)
    return MeanActivations({k: (sums[k] / counts[k]).float() for k in sums})


# --- the layer-input cache and replay ------------------------------------------------
def repeat_rows(obj, batch: int, times: int):
    """Repeat every tensor whose first dim is the batch, so k perturbations share one forward."""
    if times == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.repeat(times, *[1] * (obj.dim() - 1)) if obj.dim() and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(repeat_rows(o, batch, times) for o in obj)
    if isinstance(obj, dict):
        return {k: repeat_rows(v, batch, times) for k, v in obj.items()}
    return obj


class LayerInputs:
    """The residual stream entering each layer and the extra args each layer was called with.

    With `attention=True` it also keeps, for each cached layer, the input of the attention's
    output projection (the heads' outputs, z). A replay from that layer starts on the clean
    stream, so its attention computes exactly that z again: the replay then runs only the output
    projection on it (where head ablations act), not the q/k/v projections and the attention.
    Kept only where the clean run shows the attention's output is the projection's output.
    """

    def __init__(self, adapter: ArchAdapter, stride: int = 1, attention: bool = False):
        self.adapter, self.stride = adapter, stride
        self.hidden: list[torch.Tensor | None] = [None] * adapter.n_layers()
        self.extra: list[tuple[tuple, dict] | None] = [None] * adapter.n_layers()
        self.final: torch.Tensor | None = None
        self.attention = attention
        self.head_outputs: list[torch.Tensor | None] = [None] * adapter.n_layers()
        self._projected: dict[int, torch.Tensor] = {}          # clean run only: checked, then dropped
        self._attention_main: dict[int, torch.Tensor] = {}
        self._attention_arity: dict[int, int | None] = {}      # the attention's tuple length (None: a tensor)

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
        hooks.append(Hook(layers[-1], capture_final))
        if self.attention:
            hooks += [h for i in range(0, len(layers), self.stride) for h in self._attention_hooks(i)]
        return hooks

    def _attention_hooks(self, i: int) -> list[Hook]:
        layer = self.adapter.layers()[i]
        try:
            project = self.adapter.head_output_proj(layer)
        except AttributeError:  # the attention was replaced (a removed sublayer's stand-in): no shortcut
            return []

        def head_outputs(module, args):
            self.head_outputs[i] = args[0]

        def projected(module, args, output):
            self._projected[i] = output

        def attention_out(module, args, output):
            self._attention_main[i] = output[0] if isinstance(output, tuple) else output
            self._attention_arity[i] = len(output) if isinstance(output, tuple) else None
        return [Hook(project, head_outputs, kind="forward_pre"),
                Hook(project, projected),
                Hook(self.adapter.attention(layer), attention_out)]

    def _keep_only_exact_shortcuts(self) -> None:
        """Drop z where the attention's output is not its output projection's (a family that
        adds to it, dropout in train mode): there a replay recomputes the attention."""
        for i, z in enumerate(self.head_outputs):
            main, out = self._attention_main.get(i), self._projected.get(i)
            if z is not None and (main is None or out is None or not (main is out or torch.equal(main, out))):
                self.head_outputs[i] = None
        self._projected.clear()
        self._attention_main.clear()

    @classmethod
    def record(cls, adapter: ArchAdapter, ids: torch.Tensor, stride: int = 1, attention: bool = False) -> "LayerInputs":
        """One clean decoder forward on `ids` (no lm_head), recorded."""
        inputs = cls(adapter, stride, attention)
        with attached(inputs.hooks()):
            adapter.decoder()(ids, use_cache=False)
        if attention:
            inputs._keep_only_exact_shortcuts()
        return inputs

    def cached_start(self, layer: int) -> int:
        """The nearest layer at or below `layer` whose input is cached."""
        return layer - layer % self.stride

    def replay_from(self, layer: int, times: int = 1) -> tuple[torch.Tensor, int]:
        """The last layer's output after rerunning from the cached layer at or below `layer`, with
        `times` copies of the batch stacked; also the layer the replay started at (hooks placed on
        layers >= that one perturb it)."""
        start = self.cached_start(layer)
        cached = self.hidden[start]
        hidden = cached.repeat(times, *[1] * (cached.dim() - 1))
        with attached(self._attention_shortcut(start, times)):
            return run_layers(self.adapter, start, hidden, self, cached.shape[0], times), start

    def _attention_shortcut(self, start: int, times: int) -> list[Hook]:
        z = self.head_outputs[start]
        if z is None:
            return []
        layer = self.adapter.layers()[start]
        project, n_outputs = self.adapter.head_output_proj(layer), self._attention_arity[start]

        def attention_forward(*args, **kwargs):
            main = project(z.repeat(times, *[1] * (z.dim() - 1)))  # head ablations hook this call
            return main if n_outputs is None else (main, *[None] * (n_outputs - 1))
        return [Hook(self.adapter.attention(layer), attention_forward, kind="replace")]


def run_layers(adapter: ArchAdapter, start: int, hidden: torch.Tensor, inputs: LayerInputs,
               batch: int, times: int = 1, stop: int | None = None) -> torch.Tensor:
    """Layers start..stop-1 (default: to the end) replayed on `hidden` with the recorded extra
    args; `times` copies of the batch stacked along dim 0 share the recorded masks."""
    layers = adapter.layers()
    for i in range(start, len(layers) if stop is None else stop):
        args, kwargs = inputs.extra[i]
        out = layers[i](hidden, *repeat_rows(args, batch, times), **repeat_rows(kwargs, batch, times))
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def cache_stride(adapter: ArchAdapter, batch: torch.Tensor, budget_mb: float | None) -> int:
    """Keep every s-th layer input so the residual cache of one batch fits `budget_mb`."""
    if budget_mb is None:
        return 1
    param = next(adapter.layers()[0].parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    per_layer_mb = batch.numel() * adapter.config.hidden_size * dtype.itemsize / 2**20
    cached_layers = max(1, int(budget_mb // per_layer_mb))
    return -(-adapter.n_layers() // cached_layers)


# --- the clean reference -------------------------------------------------------------
def resident_params(module: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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


# Vocabulary columns per block of the folded path's logits. A 2048-token x 2048-entry fp32 block
# (16 MiB) stays in cache while logsumexp reads it, where a full 49k-vocabulary row block is
# written to memory and read back twice: 15-20% less time per scored token on SmolLM2 (2 cores).
VOCAB_CHUNK = 2048


def _whole_lse_and_target(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp and target entry of full-vocabulary logits."""
    lse = torch.logsumexp(logits, dim=-1)
    return lse, logits.gather(-1, targets.to(logits.device).unsqueeze(-1)).squeeze(-1)


class CleanReference:
    """What scoring one batch needs from the clean run, without its full-vocabulary tensors.

    KL(p||q) = sum p log p - sum p z + lse(z) for perturbed logits z. With z = W n (a linear
    lm_head), sum_v p_v z_v = (p W) . n, so the clean distribution is folded once into one
    hidden-sized vector per token (`p_w`), and scoring a perturbation needs only the logits'
    logsumexp and target entry, computed block by block over the vocabulary. Softcapped heads
    (Gemma 2) and heads whose weights are not resident keep the full probabilities.
    """

    def __init__(self, adapter: ArchAdapter, final_hidden: torch.Tensor, ids: torch.Tensor, chunk: int,
                 vocab_chunk: int | None = None):
        logits = adapter.logits(final_hidden[:, :-1]).float()
        logp = F.log_softmax(logits, dim=-1)
        self.clean_lse = torch.logsumexp(logits, dim=-1)        # the shift of every vocabulary block
        del logits
        self.targets = ids[:, 1:].to(logp.device)  # logits live on the lm_head's device
        probs = logp.exp()
        self.neg_entropy = (probs * logp).sum(-1)               # sum_v p log p
        # sum_v p_v is 1 only within fp32 error (~1e-5); weighting lse by it keeps that error
        # (times an lse of ~30 nats) out of every KL: exactly sum p (log p - log q) then.
        self.mass = probs.sum(-1)
        self.nll = -logp.gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)
        del logp
        self.adapter, self.chunk, self.vocab_chunk = adapter, chunk, vocab_chunk or VOCAB_CHUNK
        head = adapter.lm_head()
        weight, bias = resident_params(head)
        self.linear = (type(head) is torch.nn.Linear and weight is not None
                       and not getattr(adapter.config, "final_logit_softcapping", None))
        # Blocks of the vocabulary need the weight itself; offloaded ("meta") heads go through the module.
        self.blocks = self.linear and head.weight.device.type != "meta"
        if self.linear:
            self.p_w = probs @ weight.to(probs.device).float()
            self.p_b = probs @ bias.to(probs.device).float() if bias is not None else 0.0
            self.probs = None
        else:
            self.probs = probs

    def _lse_and_target(self, normed: torch.Tensor, targets: torch.Tensor,
                        shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logsumexp of the lm_head's logits and the target's logit, one vocabulary block at a time.

        Each block is shifted by the clean run's logsumexp (`shift`) instead of its own maximum: a
        perturbed lse rarely moves far from the clean one, and the known shift spares logsumexp's
        max pass and its temporary copy of every block (the shift is subtracted in place). Where it does move far enough for exp to
        overflow or underflow, those tokens are recomputed with per-block maxima."""
        head = self.adapter.lm_head()
        total, target_logit = torch.zeros(targets.shape, device=targets.device), torch.empty(targets.shape,
                                                                                              device=targets.device)
        column = shift.unsqueeze(-1)
        for v0, v1, logits in self._vocab_blocks(head, normed):
            logits.sub_(column)
            here = (targets >= v0) & (targets < v1)
            target_logit[here] = logits[here, targets[here] - v0]
            total += logits.exp_().sum(-1)
        lse = total.log() + shift
        unsafe = ~torch.isfinite(lse) | (total < 1e-30)
        if unsafe.any():
            lses = [torch.logsumexp(logits, dim=-1) for _, _, logits in self._vocab_blocks(head, normed[unsafe])]
            lse[unsafe] = torch.stack(lses).logsumexp(0)
        return lse, target_logit + shift

    def _vocab_blocks(self, head: torch.nn.Linear, normed: torch.Tensor):
        """(first entry, end, fp32 logits) of each block of `vocab_chunk` vocabulary entries."""
        for v0 in range(0, head.weight.shape[0], self.vocab_chunk):
            v1 = min(v0 + self.vocab_chunk, head.weight.shape[0])
            bias = head.bias[v0:v1] if head.bias is not None else None
            yield v0, v1, F.linear(normed, head.weight[v0:v1], bias).float()

    def _chunk_stats(self, h: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = self.targets[src]
        if self.linear:
            normed = self.adapter.final_norm()(h)
            p_dot_z = (normed.float() * self.p_w[src].to(normed.device)).sum(-1)
            p_dot_z = p_dot_z + (self.p_b[src].to(p_dot_z.device) if torch.is_tensor(self.p_b) else 0.0)
            if self.blocks:
                device = self.adapter.lm_head().weight.device
                lse, target_logit = self._lse_and_target(normed.to(device), targets.to(device),
                                                         self.clean_lse[src].to(device))
            else:
                lse, target_logit = _whole_lse_and_target(self.adapter.lm_head()(normed).float(), targets)
            lse, target_logit = lse.to(targets.device), target_logit.to(targets.device)
            p_dot_z = p_dot_z.to(targets.device)
        else:
            logits = self.adapter.logits(h).float()
            p_dot_z = (self.probs[src] * logits).sum(-1)
            lse, target_logit = _whole_lse_and_target(logits, targets)
        nll = lse - target_logit
        kl = self.neg_entropy[src] - p_dot_z + self.mass[src] * lse
        return nll.mean(-1), kl.mean(-1)

    def score(self, final_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean NLL and mean KL(clean || perturbed) per row of `final_hidden` (k*B rows)."""
        batch, tokens = self.targets.shape
        step = max(1, self.chunk // tokens)
        nll_rows, kl_rows = [], []
        # Row r is perturbation r // batch of clean row r % batch; a chunk may span perturbations.
        for r0 in range(0, final_hidden.shape[0], step):
            r1 = min(r0 + step, final_hidden.shape[0])
            src = torch.arange(r0, r1, device=self.targets.device) % batch
            nll, kl = self._chunk_stats(final_hidden[r0:r1, :-1], src)
            nll_rows.append(nll)
            kl_rows.append(kl)
        return torch.cat(nll_rows), torch.cat(kl_rows)

    def damage(self, final_hidden: torch.Tensor, times: int = 1) -> list[tuple[float, float]]:
        """(delta_loss, kl) of each of the `times` perturbations stacked in `final_hidden`."""
        nll, kl = self.score(final_hidden)
        batch, base = self.targets.shape[0], self.nll.mean()
        return [((nll[j * batch:(j + 1) * batch].mean() - base).item(), kl[j * batch:(j + 1) * batch].mean().item())
                for j in range(times)]
