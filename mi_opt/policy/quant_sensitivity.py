"""Quantization sensitivity: the damage each layer (or module) does when it alone is quantized.

Layer importance (what ablating a layer costs) is not quantization sensitivity: a layer can
matter a lot yet tolerate 4 bits, or matter little yet have outlier weights that 4 bits ruin.
So this measures the matching intervention: for every unit and every candidate width below 16,
replace only that unit's linears by the real bitsandbytes modules, run the calibration windows,
and record the increase of mean next-token loss and the KL to the unquantized model.

The real modules, not a quantize-dequantize shortcut: on CPUs with AVX512-BF16 bitsandbytes'
4-bit kernel computes in bf16 with bf16 scales and the int8 path quantizes activations too, so
fake-quantized fp32 weights would not give the numbers the deployed model has.

Speed: one clean forward per batch caches the residual stream entering every layer and each
layer's call arguments; a unit in layer L then reruns only layers >= L. Every (unit, width)
module is quantized once, before the loop, and swapped in and out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mi_opt.arch import ArchAdapter, get_adapter
from mi_opt.artifacts import JsonArtifact, now, versions
from mi_opt.errors import MiOptError
from mi_opt.hooks import Hook, attached
from mi_opt.plan import INT8_THRESHOLD, check_int8_threshold
from mi_opt.surgery.quantize import QUANT_TYPES, _as_linear, _linear_like, _quantized, quantized_bytes

SCHEMA = "mi-opt/quant-sensitivity"
VERSION = 1
GRANULARITIES = ("layer", "module")


@dataclass
class QuantSensitivity(JsonArtifact):
    SCHEMA = SCHEMA
    VERSION = VERSION

    model: dict                     # spec, fingerprint, model_type, n_layers
    method: dict                    # granularity, widths, quant_type, metric definitions
    calibration: dict               # source, n_samples, seq_len, batches
    base_loss: float                # mean next-token loss of the unquantized model
    # unit key ("L3" or "L3.mlp.down_proj") -> str(width) -> {delta_loss, delta_loss_se, kl, kl_se}
    scores: dict[str, dict[str, dict[str, float | None]]]
    # unit key -> {"params": weights in the unit's linears, "bytes": {str(width): storage}}
    sizes: dict[str, dict]
    cost: dict = field(default_factory=dict)
    versions: dict = field(default_factory=versions)
    created: str = field(default_factory=now)

    def damage(self, unit: str, width: int, metric: str = "kl") -> float:
        return 0.0 if width == 16 else float(self.scores[unit][str(width)][metric])

    def units(self) -> list[str]:
        return list(self.scores)

    @property
    def int8_threshold(self) -> float:
        """The LLM.int8 outlier threshold its int8 damage was measured at (files that predate
        the field were measured with pure int8, 0)."""
        return float(self.method.get("int8_threshold", 0.0))






def quant_units(adapter: ArchAdapter, granularity: str) -> dict[str, list[str]]:
    """Unit key -> full names of its linears (layer: all of them; module: one each)."""
    if granularity not in GRANULARITIES:
        raise MiOptError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    names = {id(m): n for n, m in adapter.model.named_modules()}
    units: dict[str, list[str]] = {}
    for i, layer in enumerate(adapter.layers()):
        linears = [(p, m) for p, m in layer.named_modules() if _linear_like(m)]
        if not linears:
            raise MiOptError(f"layer {i} has no full-precision linear to quantize (already quantized?)")
        if granularity == "layer":
            units[f"L{i}"] = [names[id(m)] for _, m in linears]
        else:
            units.update({f"L{i}.{p}": [names[id(m)]] for p, m in linears})
    return units


def unit_sizes(model, units: dict[str, list[str]]) -> dict[str, dict]:
    sizes = {}
    for key, names in units.items():
        shapes = [_linear_shape(model.get_submodule(n)) for n in names]
        sizes[key] = {"params": sum(o * i for o, i, _ in shapes),
                      "bytes": {str(w): sum(quantized_bytes(o * i, o, w, b) for o, i, b in shapes) for w in (4, 8, 16)}}
    return sizes


def _linear_shape(m) -> tuple[int, int, bool]:
    """(out, in, has_bias) of a Linear or a GPT-2 Conv1D (weight stored [in, out])."""
    if isinstance(m, torch.nn.Linear):
        return m.out_features, m.in_features, m.bias is not None
    i, o = m.weight.shape
    return o, i, m.bias is not None


class _Cache:
    """Residual stream entering each layer, each layer's extra call arguments, and the final hidden."""

    def __init__(self, adapter: ArchAdapter):
        self.hidden: list = [None] * adapter.n_layers()
        self.extra: list = [None] * adapter.n_layers()
        self.final = None
        self.layers = adapter.layers()

    def hooks(self) -> list[Hook]:
        def capture(i):
            def fn(module, args, kwargs):
                if args:
                    self.hidden[i], self.extra[i] = args[0], (args[1:], kwargs)
                else:
                    rest = dict(kwargs)
                    self.hidden[i] = rest.pop("hidden_states")
                    self.extra[i] = ((), rest)
            return fn

        def final(module, args, output):
            self.final = output[0] if isinstance(output, tuple) else output

        return [Hook(l, capture(i), kind="forward_pre", with_kwargs=True) for i, l in enumerate(self.layers)] + \
            [Hook(self.layers[-1], final)]

    def run_from(self, start: int) -> torch.Tensor:
        hidden = self.hidden[start]
        for i in range(start, len(self.layers)):
            args, kwargs = self.extra[i]
            out = self.layers[i](hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), ((t.std(unbiased=True) / len(values) ** 0.5).item() if len(values) > 1 else None)


def measure_quant_sensitivity(model, windows: torch.Tensor, widths: tuple[int, ...] = (4, 8),
                              granularity: str = "module", quant_type: str = "nf4", batch_size: int = 4,
                              chunk_rows: int = 1, calibration: dict | None = None,
                              model_spec: str | None = None, int8_threshold: float = INT8_THRESHOLD,
                              progress: bool = True) -> QuantSensitivity:
    """Score every unit at every width in `widths` (< 16) on `windows` (n_samples x seq_len).

    The model is left exactly as it was (modules are swapped back in a finally block).
    """
    from mi_opt.profile.ablation import _CleanReference, model_summary

    widths = tuple(sorted({int(w) for w in widths if int(w) < 16}))
    if not widths or any(w not in (4, 8) for w in widths):
        raise MiOptError(f"sensitivity widths must be 4 and/or 8 (16 is the reference), got {widths}")
    if quant_type not in QUANT_TYPES:
        raise MiOptError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    int8_threshold = check_int8_threshold(int8_threshold)
    if batch_size < 1 or chunk_rows < 1:
        raise MiOptError("batch_size and chunk_rows must be >= 1")
    adapter = get_adapter(model)
    units = quant_units(adapter, granularity)
    device = next(model.parameters()).device
    batches = [windows[i:i + batch_size].to(device) for i in range(0, len(windows), batch_size)]
    started = time.perf_counter()
    originals = {n: model.get_submodule(n) for names in units.values() for n in names}
    quantized = {(key, w): {n: _quantized(_as_linear(originals[n]), w, quant_type, int8_threshold) for n in names}
                 for key, names in tqdm(units.items(), desc="quantizing units", disable=not progress)
                 for w in widths}
    first_layer = {key: int(key[1:].split(".")[0]) for key in units}
    per_batch = {(key, w): {"delta_loss": [], "kl": []} for key in units for w in widths}
    base = []
    with torch.inference_mode(), tqdm(total=len(per_batch) * len(batches), desc=f"quant sensitivity ({granularity})",
                                      unit="run", disable=not progress) as bar:
        for ids in batches:
            cache = _Cache(adapter)
            with attached(cache.hooks()):
                adapter.decoder()(ids, use_cache=False)
            # The ablation engine's clean reference: one KL formula (folded through a linear
            # lm_head) for ablations and quantization alike.
            ref = _CleanReference(adapter, cache.final, ids, chunk=chunk_rows * (ids.shape[1] - 1))
            base_nll = ref.nll.mean()
            base.append(base_nll.item())
            for (key, w), swap in quantized.items():
                try:
                    for n, q in swap.items():
                        model.set_submodule(n, q)
                    nll, kl = ref.score(cache.run_from(first_layer[key]))
                    dl, kl = (nll.mean() - base_nll).item(), kl.mean().item()
                finally:
                    for n in swap:
                        model.set_submodule(n, originals[n])
                per_batch[(key, w)]["delta_loss"].append(dl)
                per_batch[(key, w)]["kl"].append(kl)
                bar.update(1)
            del cache, ref
    scores: dict = {key: {} for key in units}
    for (key, w), m in per_batch.items():
        dl, dl_se = _mean_se(m["delta_loss"])
        kl, kl_se = _mean_se(m["kl"])
        scores[key][str(w)] = {"delta_loss": dl, "delta_loss_se": dl_se, "kl": kl, "kl_se": kl_se}
    return QuantSensitivity(
        model=model_summary(model, adapter, model_spec),
        method={"intervention": "quantize one unit with bitsandbytes, all else full precision",
                "granularity": granularity, "widths": list(widths), "quant_type": quant_type,
                "int8_threshold": int8_threshold,
                "metrics": {"delta_loss": "increase of mean next-token NLL (nats)",
                            "kl": "mean KL(unquantized || quantized) of next-token distributions (nats)"}},
        calibration={**(calibration or {}), "n_samples": len(windows), "seq_len": int(windows.shape[1]),
                     "batch_size": batch_size, "n_batches": len(batches)},
        base_loss=sum(base) / len(base), scores=scores, sizes=unit_sizes(model, units),
        cost={"wall_time_s": round(time.perf_counter() - started, 3), "runs": len(per_batch) * len(batches)})
