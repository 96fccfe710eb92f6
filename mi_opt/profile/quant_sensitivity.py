"""Quantization sensitivity: the damage each layer (or module) does when it alone is quantized.

Layer importance (what ablating a layer costs) is not quantization sensitivity: a layer can
matter a lot yet tolerate 4 bits, or matter little yet have outlier weights that 4 bits ruin.
So this measures the matching intervention: for every unit and every candidate width below 16,
replace only that unit's linears by the modules of the plan's quantization backend (mi_opt/quant/:
bitsandbytes, torchao or gguf), run the calibration windows, and record the increase of mean
next-token loss and the KL to the unquantized model. The backend's name and version are recorded
in `method`, and the bit planner refuses a sensitivity measured with another backend.

The backend's real modules, not a generic quantize-dequantize shortcut: on CPUs with AVX512-BF16
bitsandbytes' 4-bit kernel computes in bf16 with bf16 scales and its int8 path quantizes
activations too, while torchao int8 weight-only rounds only the weights, so one backend's numbers
say little about another's.

Speed: a perturbation + replay through mi_opt/profile/engine.py, like ablation: one clean
forward per batch caches the residual stream entering every layer and each layer's call
arguments; a unit in layer L then reruns only layers >= L. Every (unit, width) module is
quantized once, before the loop, and swapped in and out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mi_opt.arch import ArchAdapter, get_adapter
from mi_opt.artifacts import JsonArtifact, now, versions
from mi_opt.errors import MiOptError
from mi_opt.handle import as_loaded, model_summary
from mi_opt.plan import INT8_THRESHOLD, check_int8_threshold
from mi_opt.profile.engine import CleanReference, LayerInputs, calibration_batches, mean_and_se
from mi_opt.units import BIT_WIDTHS, Unit, layer_of

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
    def backend(self) -> str:
        """The quantization backend it was measured with (files that predate the field: bitsandbytes)."""
        return self.method.get("backend", "bitsandbytes")

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
        linears = adapter.full_precision_linears(layer)
        if not linears:
            raise MiOptError(f"layer {i} has no full-precision linear to quantize (already quantized?)")
        if granularity == "layer":
            units[Unit(i, "layer").key] = [names[id(m)] for m in linears.values()]
        else:
            units.update({f"{Unit(i, 'layer').key}.{p}": [names[id(m)]] for p, m in linears.items()})
    return units


def unit_sizes(model, units: dict[str, list[str]], backend: str = "bitsandbytes") -> dict[str, dict]:
    from mi_opt.quant import get_backend

    quantizer = get_backend(backend)
    adapter = get_adapter(model)
    sizes = {}
    for key, names in units.items():
        shapes = [adapter.linear_shape(model.get_submodule(n)) for n in names]
        sizes[key] = {"params": sum(o * i for o, i, _ in shapes),
                      "bytes": {str(w): sum(quantizer.quantized_bytes(o * i, o, w, b) for o, i, b in shapes)
                                for w in quantizer.widths()}}
    return sizes


def measure_quant_sensitivity(model, windows: torch.Tensor, widths: tuple[int, ...] = (4, 8),
                              granularity: str = "module", quant_type: str | None = None, batch_size: int = 4,
                              chunk_rows: int = 1, calibration: dict | None = None,
                              model_spec: str | None = None, int8_threshold: float = INT8_THRESHOLD,
                              progress: bool = True, backend: str = "bitsandbytes") -> QuantSensitivity:
    """Score every unit at every width in `widths` (< 16) on `windows` (n_samples x seq_len), quantized
    by `backend` (quant_type: its 4-bit format, None for its default).

    The model is left exactly as it was (modules are swapped back in a finally block).
    """
    from mi_opt.quant import QuantOptions, get_backend

    quantizer = get_backend(backend)
    widths = tuple(sorted({int(w) for w in widths if int(w) < 16}))
    if not widths or any(w not in BIT_WIDTHS for w in widths):
        raise MiOptError(f"sensitivity widths must be among {BIT_WIDTHS[:-1]} (16 is the reference), got {widths}")
    quantizer.check_widths(widths, "the sensitivity measurement")
    # checked against the backend's 4-bit formats (or its default); None for a backend without 4-bit
    quant_type = quantizer.quant_type(quant_type) if 4 in quantizer.formats or quant_type is not None else None
    int8_threshold = check_int8_threshold(int8_threshold)
    options = QuantOptions(quant_type, int8_threshold)
    if batch_size < 1 or chunk_rows < 1:
        raise MiOptError("batch_size and chunk_rows must be >= 1")
    loaded = as_loaded(model, model_spec)
    model, adapter = loaded.model, loaded.adapter
    units = quant_units(adapter, granularity)
    batches = calibration_batches(windows, batch_size, adapter.input_device())
    started = time.perf_counter()
    originals = {n: model.get_submodule(n) for names in units.values() for n in names}
    quantized = {(key, w): {n: quantizer.quantized_linear(adapter.as_linear(originals[n]), w, options)
                            for n in names}
                 for key, names in tqdm(units.items(), desc="quantizing units", disable=not progress)
                 for w in widths}
    first_layer = {key: layer_of(key) for key in units}
    per_batch = {(key, w): {"delta_loss": [], "kl": []} for key in units for w in widths}
    base = []
    with torch.inference_mode(), tqdm(total=len(per_batch) * len(batches), desc=f"quant sensitivity ({granularity})",
                                      unit="run", disable=not progress) as bar:
        for ids in batches:
            cache = LayerInputs.record(adapter, ids)
            # The ablation engine's clean reference: one KL formula (folded through a linear
            # lm_head) for ablations and quantization alike.
            ref = CleanReference(adapter, cache.final, ids, chunk=chunk_rows * (ids.shape[1] - 1))
            base.append(ref.nll.mean().item())
            for (key, w), swap in quantized.items():
                try:
                    for n, q in swap.items():
                        model.set_submodule(n, q)
                    [(dl, kl)] = ref.damage(cache.replay_from(first_layer[key])[0])
                finally:
                    for n in swap:
                        model.set_submodule(n, originals[n])
                per_batch[(key, w)]["delta_loss"].append(dl)
                per_batch[(key, w)]["kl"].append(kl)
                bar.update(1)
            del cache, ref
    scores: dict = {key: {} for key in units}
    for (key, w), m in per_batch.items():
        dl, dl_se = mean_and_se(m["delta_loss"])
        kl, kl_se = mean_and_se(m["kl"])
        scores[key][str(w)] = {"delta_loss": dl, "delta_loss_se": dl_se, "kl": kl, "kl_se": kl_se}
    return QuantSensitivity(
        model=model_summary(loaded, adapter, model_spec),
        method={"intervention": f"quantize one unit with {backend}, all else full precision",
                "backend": backend, "backend_version": quantizer.version(), "granularity": granularity, "widths": list(widths), "quant_type": quant_type,
                "int8_threshold": int8_threshold,
                "metrics": {"delta_loss": "increase of mean next-token NLL (nats)",
                            "kl": "mean KL(unquantized || quantized) of next-token distributions (nats)"}},
        calibration={**(calibration or {}), "n_samples": len(windows), "seq_len": int(windows.shape[1]),
                     "batch_size": batch_size, "n_batches": len(batches)},
        base_loss=sum(base) / len(base), scores=scores, sizes=unit_sizes(model, units, backend),
        cost={"wall_time_s": round(time.perf_counter() - started, 3), "runs": len(per_batch) * len(batches)})
