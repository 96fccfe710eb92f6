"""Decode latency as a function of the number of decoder layers, measured on this machine.

A latency budget cannot be read off parameter counts: the embedding lookup, final norm,
output projection and per-token overhead cost the same however many layers remain. Two
timings (the whole model, and a copy with half its layers removed) fit
    latency(layers kept) = fixed + per_layer * layers kept,
which holds for decoders whose layers all have the same shape.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

from torch import nn

from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError


@dataclass(frozen=True)
class LayerLatency:
    n_layers: int
    full_ms: float       # measured decode ms/token of the whole model (batch 1, KV cache)
    per_layer_ms: float  # what one decoder layer adds to it
    fixed_ms: float      # the rest: embedding, final norm, output projection, overhead

    def after(self, n_dropped: int) -> float:
        return self.fixed_ms + self.per_layer_ms * (self.n_layers - n_dropped)

    def layers_to_drop(self, fraction: float) -> int:
        """Fewest layers to drop so that predicted latency <= fraction x full latency."""
        if self.per_layer_ms <= 0:
            raise MiOptError("dropping layers did not make decoding measurably faster on this machine "
                             f"(whole model {self.full_ms:.2f} ms/token): a latency budget cannot be planned; "
                             "use n_drop or a parameter budget")
        need = (self.full_ms - fraction * self.full_ms) / self.per_layer_ms
        return max(0, math.ceil(need - 1e-9))

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def measure_layer_latency(model: nn.Module, prompt_len: int = 32, new_tokens: int = 17,
                          repetitions: int = 5) -> LayerLatency:
    """Time greedy decoding of the model and of a copy without its second half of layers."""
    from mi_opt.evaluate.config import SpeedConfig
    from mi_opt.evaluate.speed import measure_speed
    from mi_opt.surgery.layers import drop_layers_

    n = get_adapter(model).n_layers()
    if n < 2:
        raise MiOptError(f"a latency fit needs at least 2 decoder layers, the model has {n}")
    config = SpeedConfig(prompt_len=prompt_len, new_tokens=new_tokens, repetitions=repetitions)

    def decode_ms(m: nn.Module) -> float:
        return measure_speed(m, config, progress=False)["decode_ms_per_token"]["median"]

    full = decode_ms(model)
    removed = n // 2
    half = decode_ms(drop_layers_(copy.deepcopy(model), list(range(n - removed, n))))
    per_layer = (full - half) / removed
    return LayerLatency(n_layers=n, full_ms=full, per_layer_ms=per_layer, fixed_ms=full - per_layer * n)
