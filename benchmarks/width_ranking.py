"""Which neuron ranking, which mode? Calibration loss of SmolLM2 after 20% of its decoder is
removed as MLP neuron groups, for each metric of the attribution profile (its signed first-order
delta_loss, its KL estimate) and each width-prune mode (uniform: one MLP size; free: per layer).

Cheap (one forward of 8 x 256 calibration tokens per plan): it chose the width benchmark's
neuron plans. Reads the benchmark's attribution profile (reports/width/profiles/width.json,
made by `python benchmarks/width.py`); writes reports/width_ranking.json.

    python benchmarks/width_ranking.py
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from mi_opt.artifacts import model_fingerprint, versions, write_json
from mi_opt.data import token_windows
from mi_opt.models import load_model
from mi_opt.policy import make_plan
from mi_opt.profile.importance import ImportanceProfile
from mi_opt.surgery import apply_

ROOT = Path(__file__).resolve().parent.parent


def calibration_loss(model, windows: torch.Tensor, batch: int = 4) -> float:
    with torch.inference_mode():
        losses = [model(windows[i:i + batch], labels=windows[i:i + batch]).loss.item()
                  for i in range(0, len(windows), batch)]
    return sum(losses) / len(losses)


def main() -> None:
    model, tokenizer = load_model("smollm2-135m")
    windows = token_windows(tokenizer, "handbook", 8, 256, split="calibration")
    base = calibration_loss(model, windows)
    profile = ImportanceProfile.load(ROOT / "reports" / "width" / "profiles" / "width.json")
    profile.model["fingerprint"] = model_fingerprint(model)
    rows = []
    for metric in ("delta_loss", "kl"):
        for mode in ("uniform", "free"):
            plan = make_plan(profile, "width-prune", {"fraction": 0.2, "mode": mode, "metric": metric},
                             model=model, progress=False)
            pruned = copy.deepcopy(model)
            apply_(pruned, plan)
            rows.append({"metric": metric, "mode": mode, "mlp_sizes": plan.predicted["mlp_sizes"],
                         "parameter_fraction": plan.predicted["parameter_fraction"],
                         "delta_calibration_loss": calibration_loss(pruned, windows) - base})
            print(f"{metric:10s} {mode:8s} +{rows[-1]['delta_calibration_loss']:.3f} nats", flush=True)
            del pruned
    write_json(ROOT / "reports" / "width_ranking.json",
               {"base_calibration_loss": base, "windows": "handbook calibration split, 8 x 256, seed 0",
                "rows": rows, "versions": versions()})


if __name__ == "__main__":
    main()
