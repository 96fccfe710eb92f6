"""Non-finite losses and scores stop profiling and planning, naming where they appeared."""
from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_model, tiny_windows

from mi_opt.errors import MiOptError
from mi_opt.profile.finite import check_batches
from mi_opt.profile.scorers import run_scorer

NAN = float("nan")


def _corrupted(layer: int = 2):
    """A tiny model whose layer `layer` MLP weights are NaN, as in a damaged checkpoint."""
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight.fill_(NAN)
    return model


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_ablation_of_a_corrupted_model_stops_at_the_first_batch(engine):
    with pytest.raises(MiOptError, match="base loss on calibration batch 0 is not finite"):
        run_scorer("ablation", _corrupted(), tiny_windows(4, 16), {"unit_kinds": ("layer",), "engine": engine,
                                                                    "batch_size": 2}, progress=False)


@pytest.mark.parametrize("scorer", ["block_influence", "angular_distance", "attribution", "weight_magnitude"])
def test_every_scorer_refuses_to_return_nan_scores(scorer):
    # Scorers that see per-batch losses name the batch; the others name the profile's first bad value.
    with pytest.raises(MiOptError, match=rf"base loss on calibration batch 0 is nan|scorer '{scorer}': "
                                         r"(base loss is nan|unit L\d+ has delta_loss nan)"):
        run_scorer(scorer, _corrupted(), tiny_windows(4, 16), {"unit_kinds": ("layer",)}, progress=False)


@pytest.mark.parametrize("per_batch,message", [
    ({"L0": {"delta_loss": [0.1, 0.2], "kl": [0.1, 0.1]}, "L1": {"delta_loss": [0.1, NAN], "kl": [0.1, NAN]}},
     "ablating L1 on calibration batch 1 gives delta_loss nan"),
    ({"L0": {"delta_loss": [0.1, 0.2], "kl": [float("inf"), 0.1]}, "L1": {"delta_loss": [0.1, 0.3], "kl": [0.1, 1]}},
     "ablating L0 on calibration batch 0 gives kl inf"),
    ({"L0": {"delta_loss": [0.1, NAN], "kl": [0.1, NAN]}, "L1": {"delta_loss": [0.1, NAN], "kl": [0.1, NAN]}},
     "base loss on calibration batch 1 is not finite"),
])
def test_check_batches_names_the_first_batch_and_unit(per_batch, message):
    with pytest.raises(MiOptError, match=message):
        check_batches(per_batch)


def test_a_planner_refuses_a_profile_with_a_nan_score(tmp_path):
    from mi_opt.policy import make_plan
    from mi_opt.profile.importance import ImportanceProfile

    model = tiny_model()
    profile = run_scorer("block_influence", model, tiny_windows(4, 16), {"unit_kinds": ("layer",)}, progress=False)
    data = profile.to_dict()
    data["scores"]["L2"]["delta_loss"] = NAN
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))  # as an older mi-opt wrote it: NaN in the JSON
    with pytest.raises(MiOptError, match="unit L2 has delta_loss nan"):
        make_plan(ImportanceProfile.load(path), "layer-skip", {"n_drop": 1}, model)
