"""Cost model of an ablation profile: forward passes, tokens, FLOPs and GPU-hours before running.

Mirrors what the engines in ablation.py do, so the forward-pass count is exact (it is checked
against `profile.cost["full_forward_equivalents"]` in tests and in benchmarks/profile_cost_model.py);
FLOPs and hours are estimates from the usual 2 x parameters per token rule plus attention.

  naive: every unit costs one full forward per batch, plus one clean forward.
  fast:  one clean forward per batch; a unit in layer L reruns layers s..N-1 only, where s is
         the nearest cached layer at or below L (s = L without a cache budget).
Both engines project every ablated row to the vocabulary once, so the output layer costs
(1 + units) projections per token regardless of engine: it dominates for small models with
big vocabularies (SmolLM2-135M: 28M of 135M parameters are the tied embedding).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from mi_opt.errors import MiOptError


@dataclass
class ModelShape:
    n_layers: int
    d_model: int
    vocab: int
    layer_params: int        # parameters of one decoder layer (attention + MLP + norms)

    @classmethod
    def of(cls, model) -> "ModelShape":
        from mi_opt.arch import get_adapter

        adapter = get_adapter(model)
        layer = adapter.layers()[0]
        return cls(adapter.n_layers(), model.config.hidden_size, model.config.vocab_size,
                   sum(p.numel() for p in layer.parameters()))


@dataclass
class CostEstimate:
    full_forward_equivalents: float  # decoder work in full forwards of one batch, summed over batches
                                     # (= profile.cost["full_forward_equivalents"]; naive: "full_forwards")
    tokens_processed: float          # token-layers / n_layers: tokens pushed through the whole decoder
    flops: float
    gpu_hours: float                 # device-hours at the given sustained throughput (any number of GPUs)
    wall_hours: float                # gpu_hours / n_gpus: units shard evenly, no communication to speak of

    def to_dict(self) -> dict:
        return asdict(self)


def unit_start_layers(unit_layers: list[int], cache_stride: int = 1) -> list[int]:
    return [layer - layer % cache_stride for layer in unit_layers]


def forward_equivalents(n_layers: int, unit_layers: list[int], engine: str = "fast", cache_stride: int = 1) -> float:
    """Decoder-layer work per calibration batch, in full forwards: what profile.cost reports."""
    if engine == "naive":
        return 1.0 + len(unit_layers)
    if engine != "fast":
        raise MiOptError(f"engine must be 'fast' or 'naive', got {engine!r}")
    return 1.0 + sum(n_layers - s for s in unit_start_layers(unit_layers, cache_stride)) / n_layers


def estimate(shape: ModelShape, unit_layers: list[int], n_samples: int, seq_len: int, batch_size: int = 4,
             engine: str = "fast", cache_stride: int = 1, mean_ablation: bool = False, sustained_tflops: float = 300.0,
             n_gpus: int = 1) -> CostEstimate:
    """Whole-profile cost. sustained_tflops: what one device really delivers on these shapes
    (an H100 does ~990 dense bf16 TFLOP/s peak; 30-40% of that is typical for inference-sized
    batches). Measure yours with one clean forward and pass it in."""
    if min(n_samples, seq_len, batch_size, n_gpus) < 1 or sustained_tflops <= 0:
        raise MiOptError("n_samples, seq_len, batch_size and n_gpus must be >= 1 and sustained_tflops > 0")
    per_batch = forward_equivalents(shape.n_layers, unit_layers, engine, cache_stride)
    n_batches = -(-n_samples // batch_size)
    fe = per_batch + (1.0 if mean_ablation else 0.0)   # the mean pass is one more clean forward
    tokens = n_samples * seq_len
    # Per token and layer: 2 FLOPs per weight, plus QK^T and AV over (on average) half the window.
    layer_flops = 2 * shape.layer_params + 2 * seq_len * shape.d_model
    head_flops = 2 * shape.d_model * shape.vocab
    projections = 1 + len(unit_layers) + (1 if mean_ablation else 0)
    flops = tokens * (fe * shape.n_layers * layer_flops + projections * head_flops)
    hours = flops / (sustained_tflops * 1e12) / 3600
    return CostEstimate(full_forward_equivalents=per_batch * n_batches, tokens_processed=fe * tokens,
                        flops=flops, gpu_hours=hours, wall_hours=hours / n_gpus)


def measured_forward_equivalents(cost: dict) -> float:
    """A finished profile's work in full forwards of one batch, comparable across scorers.

    Ablation profiles report it; the others report passes, and a backward pass costs about
    two forwards (it computes gradients for activations and weights' inputs alike).
    """
    if "full_forward_equivalents" in cost:
        return float(cost["full_forward_equivalents"]) + float(cost.get("mean_pass_forwards", 0))
    return float(cost.get("forwards", 0)) + 2.0 * float(cost.get("backwards", 0))
