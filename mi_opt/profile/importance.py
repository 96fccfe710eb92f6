"""ImportanceProfile: scores per unit, with everything needed to trust and reuse them.

Version 2: `kl` (and `kl_se`) may be None, where a scorer measures no KL (the non-causal
baselines, the neuron statistics): a version-1 file stored such a scorer's score under
both names, and a planner reading "kl" then ranked by a number that was no KL. Version-1
files still load; those of non-causal scorers lose their copied kl on the way in.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from mi_opt.artifacts import JsonArtifact, now, versions
from mi_opt.errors import MiOptError
from mi_opt.units import parse_unit

SCHEMA = "mi-opt/importance-profile"
VERSION = 2
METRICS = ("delta_loss", "kl")
# Scorers whose version-1 files held their score under kl as a copy of delta_loss.
_COPIED_KL = ("block_influence", "angular_distance", "weight_magnitude", "random")


@dataclass
class UnitScore:
    """Mean over calibration batches of one metric's per-batch value, and its standard error.

    delta_loss holds every scorer's ranking score (higher = more important); kl is None where
    the scorer measures no KL. Standard errors are None where nothing was sampled."""

    delta_loss: float
    delta_loss_se: float | None
    kl: float | None = None
    kl_se: float | None = None


@dataclass
class ImportanceProfile(JsonArtifact):
    SCHEMA = SCHEMA
    VERSION = VERSION

    model: dict                 # spec, fingerprint, model_type, n_layers, heads per layer
    method: dict                # scorer, ablation kind, engine, notes
    calibration: dict           # source, n_samples, seq_len, seed, batch_size, split
    base_loss: float | None     # mean next-token loss of the unablated model (None: scorer never computes it)
    scores: dict[str, UnitScore]
    cost: dict = field(default_factory=dict)      # wall_time_s, forward/backward counts
    versions: dict = field(default_factory=versions)
    created: str = field(default_factory=now)

    def score(self, unit: str, metric: str = "delta_loss") -> float | None:
        """One unit's score; None for kl where the scorer measures no KL (see has_metric)."""
        return getattr(self.scores[unit], metric)

    def has_metric(self, metric: str) -> bool:
        """True when every unit has a value for `metric` (a non-causal scorer's profile has no kl)."""
        return bool(self.scores) and all(getattr(s, metric) is not None for s in self.scores.values())

    def units(self, kind: str | None = None) -> list[str]:
        keys = sorted(self.scores, key=parse_unit)
        return [k for k in keys if kind is None or parse_unit(k).kind == kind]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scores"] = {k: asdict(v) for k, v in self.scores.items()}
        return {"schema": SCHEMA, "version": VERSION, **d}


    @classmethod
    def from_dict(cls, d: dict) -> "ImportanceProfile":
        version = d.get("version", VERSION)
        d = {k: v for k, v in d.items() if k not in ("schema", "version")}
        if not isinstance(d.get("scores"), dict) or not isinstance(d.get("model"), dict):
            raise MiOptError("a profile needs a 'model' object and a 'scores' object of unit -> scores")
        d["scores"] = {k: _unit_score(k, v, d["model"].get("n_layers")) for k, v in d["scores"].items()}
        method = d.get("method")
        if version == 1 and isinstance(method, dict) and method.get("scorer") in _COPIED_KL:
            for score in d["scores"].values():  # a copy of the score, not a KL: v2 says "not measured"
                score.kl = score.kl_se = None
        return cls(**d)


def _unit_score(key: str, value, n_layers: int | None) -> UnitScore:
    """One loaded score, checked: profiles are files people edit, and a string sorts silently."""
    unit = parse_unit(key)
    if isinstance(n_layers, int) and not 0 <= unit.layer < n_layers:
        raise MiOptError(f"unit {key} is outside the profiled model's {n_layers} layers")
    if not isinstance(value, dict):
        raise MiOptError(f"unit {key}: expected an object of scores, got {value!r}")
    score = UnitScore(**value)
    for name, v in asdict(score).items():
        if (v is None and name != "delta_loss") or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            continue
        raise MiOptError(f"unit {key}: {name} must be a number, got {v!r}")
    return score

