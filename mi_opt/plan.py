"""CompressionPlan: what to remove or quantize, with the budget it was made for.

Every layer index in a plan refers to the ORIGINAL model's numbering (the one the
profile scored), whatever order surgery applies the steps in.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from mi_opt.artifacts import JsonArtifact, now, versions
from mi_opt.errors import MiOptError
from mi_opt.units import BIT_WIDTHS, HEAD_MODES, QUANT_TYPES, WIDTH_MODES

SCHEMA = "mi-opt/compression-plan"
VERSION = 2  # 2: prune_neurons and neuron_mode (version 1 files read as "no neurons pruned")

# LLM.int8()'s outlier threshold (Dettmers et al., 2022; transformers' default): input columns
# with any |activation| > 6 are multiplied in 16-bit, the rest in int8. On SmolLM2 with every
# layer int8 (reports/bits.md): +0.58 perplexity at 6.0 against +1.19 at 0.0 (pure vector-wise
# int8); int8-rounded weights with fp32 activations cost only +0.05 in a quick check, so the
# damage is activation rounding, which the outlier columns mostly avoid. The outlier columns are
# chosen per forward, so a row's output depends slightly on the rest of its batch. Recorded in
# the export's metadata and BitsAndBytesConfig, so a reload computes exactly as mi-opt did.
INT8_THRESHOLD = 6.0


def check_int8_threshold(value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise MiOptError(f"int8_threshold must be a number >= 0 (0 = pure int8, 6.0 = LLM.int8's outlier "
                         f"columns in 16-bit), got {value!r}")
    return float(value)


@dataclass
class CompressionPlan(JsonArtifact):
    SCHEMA = SCHEMA
    VERSION = VERSION

    model: dict                                           # spec, fingerprint, n_layers of the source model
    drop_layers: list[int] = field(default_factory=list)  # original layer indices to delete
    prune_heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> query heads to delete
    head_mode: str = "uniform"                            # "uniform": plain-transformers loadable
    prune_neurons: dict[int, list[int]] = field(default_factory=dict)  # layer -> MLP neurons to delete
    neuron_mode: str = "uniform"                          # "uniform": one MLP size, plain-transformers loadable
    # Bits per target. Keys: "L<i>" (every linear of layer i), "L<i>.<module path>" (one module,
    # path relative to the layer, e.g. "L3.self_attn.q_proj"), "embed", "lm_head". Missing = 16.
    bits: dict[str, int] = field(default_factory=dict)
    quant_type: str | None = "nf4"                        # 4-bit format: bitsandbytes "nf4"/"fp4", GGUF "Q4_0"...
    int8_threshold: float = INT8_THRESHOLD                # LLM.int8 outlier threshold (0 = pure int8)
    # Which quantization backend carries out `bits` (mi_opt/quant/): "bitsandbytes" (what plans
    # without the field meant), "torchao" or "gguf". Its widths and formats are checked by apply_.
    backend: str = "bitsandbytes"
    budget: dict = field(default_factory=dict)            # what the planner was asked for
    predicted: dict = field(default_factory=dict)         # parameters, bytes after the plan
    planner: dict = field(default_factory=dict)           # planner name and its config
    profile: dict = field(default_factory=dict)           # fingerprint/scorer/path of the source profile
    versions: dict = field(default_factory=versions)
    created: str = field(default_factory=now)

    def __post_init__(self):
        self.prune_heads = {int(k): sorted(int(h) for h in v) for k, v in self.prune_heads.items() if v}
        self.prune_neurons = {int(k): sorted(int(n) for n in v) for k, v in self.prune_neurons.items() if v}
        self.drop_layers = sorted(int(i) for i in self.drop_layers)
        if self.head_mode not in HEAD_MODES:
            raise MiOptError(f"head_mode must be one of {HEAD_MODES}, got {self.head_mode!r}")
        if self.neuron_mode not in WIDTH_MODES:
            raise MiOptError(f"neuron_mode must be one of {WIDTH_MODES}, got {self.neuron_mode!r}")
        bad = {k: b for k, b in self.bits.items() if b not in BIT_WIDTHS}
        if bad:
            raise MiOptError(f"bit widths must be in {BIT_WIDTHS}; got {bad}")
        from mi_opt.quant import BACKENDS  # the registry: a name that is no backend fails here, in one sentence

        BACKENDS.get(self.backend)
        if self.backend == "bitsandbytes" and self.quant_type not in QUANT_TYPES:
            raise MiOptError(f"quant_type must be nf4 or fp4, got {self.quant_type!r}")
        self.int8_threshold = check_int8_threshold(self.int8_threshold)

    def is_empty(self) -> bool:
        return not (self.drop_layers or self.prune_heads or self.prune_neurons
                    or any(b < 16 for b in self.bits.values()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prune_heads"] = {str(k): v for k, v in self.prune_heads.items()}
        d["prune_neurons"] = {str(k): v for k, v in self.prune_neurons.items()}
        return {"schema": SCHEMA, "version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionPlan":
        # apply_ checks the model against this fingerprint; a plan file without one would be
        # applied to any model at all.
        if not isinstance(d.get("model"), dict) or not isinstance(d["model"].get("fingerprint"), str):
            raise MiOptError("the plan records no model fingerprint (model.fingerprint), so it cannot be checked "
                             "against the model it is applied to; re-make it with mi-opt plan")
        return super().from_dict(d)



