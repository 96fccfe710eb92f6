"""EvalResult: what one evaluation measured, with the settings, machine and versions behind it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mi_opt.artifacts import JsonArtifact, atomic_write_bytes, machine, now, versions

SCHEMA = "mi-opt/eval"
# 2: tasks carry "score" (interval) and "items" (per-item scores), perplexity its interval and
# per-window NLL, so two results can be compared item by item. Version 1 files still load; their
# comparisons show no intervals.
VERSION = 2
LM_EVAL_SUFFIX = ".lm_eval.json"


def lm_eval_path(path: str | Path) -> Path:
    """Where lm-eval's own results sit beside an eval file: eval.json -> eval.lm_eval.json."""
    path = Path(path)
    return path.with_name(path.stem + LM_EVAL_SUFFIX)


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

    # lm-eval's results dict as simple_evaluate returned it (samples left out): written beside
    # the eval file by save(), in lm-eval's own shape, so lm-eval's tooling can read it.
    lm_eval_results: dict | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("lm_eval_results", None)
        return out

    def save(self, path: str | Path) -> Path:
        path = super().save(path)
        if self.lm_eval_results:
            from lm_eval.utils import handle_non_serializable

            text = json.dumps(self.lm_eval_results, indent=2, default=handle_non_serializable, ensure_ascii=False)
            atomic_write_bytes(lm_eval_path(path), (text + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EvalResult":
        result = super().load(path)
        beside = lm_eval_path(path)
        if beside.is_file():
            try:
                result.lm_eval_results = json.loads(beside.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                result.lm_eval_results = None  # optional and lm-eval's: a damaged copy is not carried on
        return result

    def task_mean(self) -> float | None:
        """Mean of every task's primary metric: the single accuracy figure of Pareto plots."""
        scores = [t["metrics"][t["primary"]] for t in self.tasks.values()]
        return sum(scores) / len(scores) if scores else None




