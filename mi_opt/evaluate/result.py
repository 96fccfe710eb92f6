"""EvalResult: what one evaluation measured, with the settings, machine and versions behind it."""
from __future__ import annotations

from dataclasses import dataclass, field

from mi_opt.artifacts import JsonArtifact, machine, now, versions

SCHEMA = "mi-opt/eval"
VERSION = 1


@dataclass
class EvalResult(JsonArtifact):
    SCHEMA = SCHEMA
    VERSION = VERSION

    model: dict                          # spec, fingerprint, model_type, family, n_layers, dtype
    settings: dict                       # the EvalConfig, as a dict
    perplexity: dict | None = None       # perplexity, bits_per_byte, n_tokens, n_bytes, source, ...
    tasks: dict = field(default_factory=dict)   # task -> metrics, primary metric, n, examples
    speed: dict | None = None            # prefill/ttft/decode summaries, memory, parameters, size
    wall_time_s: dict = field(default_factory=dict)  # seconds per part
    machine: dict = field(default_factory=machine)
    versions: dict = field(default_factory=versions)
    created: str = field(default_factory=now)

    def task_mean(self) -> float | None:
        """Mean of every task's primary metric: the single accuracy figure of Pareto plots."""
        scores = [t["metrics"][t["primary"]] for t in self.tasks.values()]
        return sum(scores) / len(scores) if scores else None




