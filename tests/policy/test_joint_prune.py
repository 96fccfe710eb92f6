"""Joint-prune planner: the chosen depth/heads/width mix is the measured least damaging candidate."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from hand_profiles import hand_profile
from tiny import save_tiny, tiny_model, tiny_windows

from mi_opt.errors import MiOptError
from mi_opt.policy import make_plan
from mi_opt.policy.joint_prune import mixes
from mi_opt.surgery import apply_

OPEN = {"protect_first": 0, "protect_last": 0}


@pytest.fixture(scope="module")
def setup():
    return tiny_model("llama"), tiny_windows(4, 16), hand_profile(layers=True)


def _damage(model, windows, plan) -> tuple[float, float]:
    """Mean next-token loss and KL(original || pruned), computed independently of the planner."""
    pruned = apply_(copy.deepcopy(model), plan)
    with torch.no_grad():
        ref = F.log_softmax(model(windows).logits[:, :-1].float(), -1)
        out = F.log_softmax(pruned(windows).logits[:, :-1].float(), -1)
    loss = F.nll_loss(out.transpose(1, 2), windows[:, 1:]).item()
    return loss, (ref.exp() * (ref - out)).sum(-1).mean().item()


def test_mixes_cover_the_grid_with_the_pure_ones():
    grid = mixes(["layers", "heads", "neurons"], 0.25)
    assert len(grid) == 15 and all(sum(m.values()) == pytest.approx(1) for m in grid)
    for part in ("layers", "heads", "neurons"):
        assert {"layers": 0.0, "heads": 0.0, "neurons": 0.0, part: 1.0} in grid
    assert mixes(["neurons"], 0.5) == [{"neurons": 1.0}]


@pytest.mark.parametrize("select", ["kl", "loss"])
def test_the_chosen_mix_is_the_measured_least_damaging(setup, select):
    model, windows, profile = setup
    plan = make_plan(profile, "joint-prune", {"fraction": 0.3, "select": select, **OPEN}, model, windows=windows,
                     progress=False)
    candidates = plan.planner["candidates"]
    assert len(candidates) == 15 and sum(c["chosen"] for c in candidates) == 1
    measured = [c for c in candidates if "kl" in c]
    chosen = next(c for c in candidates if c["chosen"])
    assert chosen[select] == min(c[select] for c in measured)
    assert plan.planner["chosen_mix"] == chosen["mix"]
    # Several kinds of candidate were really built (not every mix collapses to one plan).
    kinds = {(bool(c["drop_layers"]), c["heads_removed"] > 0, c["neurons_removed"] > 0) for c in measured}
    assert len(kinds) >= 3
    # Every measured candidate meets the budget, and the planner's measurement is the real one.
    target = plan.budget["remove_params"]
    assert all(c["parameters"] <= plan.predicted["parameters_before"] - target for c in measured)
    loss, kl = _damage(model, windows, plan)
    assert loss == pytest.approx(chosen["loss"], abs=1e-4) and kl == pytest.approx(chosen["kl"], abs=1e-4)
    pruned = apply_(tiny_model("llama"), plan)
    assert sum(p.numel() for p in pruned.parameters()) == plan.predicted["parameters"]


def test_free_mode_and_a_subset_of_parts(setup):
    model, windows, profile = setup
    plan = make_plan(profile, "joint-prune", {"fraction": 0.2, "mode": "free", "parts": ["heads", "neurons"],
                                              "step": 0.5}, model, windows=windows, progress=False)
    assert [c["mix"] for c in plan.planner["candidates"]] == [
        {"heads": 1.0, "neurons": 0.0}, {"heads": 0.5, "neurons": 0.5}, {"heads": 0.0, "neurons": 1.0}]
    assert not plan.drop_layers and plan.head_mode == plan.neuron_mode == "free"
    pruned = apply_(tiny_model("llama"), plan)
    assert sum(p.numel() for p in pruned.parameters()) == plan.predicted["parameters"]


def test_refuses_without_windows_or_scores(setup):
    model, _, profile = setup
    with pytest.raises(MiOptError, match="needs calibration windows|measures every candidate .* got none"):
        make_plan(profile, "joint-prune", {"fraction": 0.2}, model)
    with pytest.raises(MiOptError, match="parts \\['neurons'\\] need \\['neurons'\\] scores"):
        make_plan(hand_profile(neurons=False, layers=True), "joint-prune", {"fraction": 0.2, "parts": ["layers", "neurons"]},
                  model, windows=tiny_windows(2, 8))
    for bad, message in [({"fraction": 0.2, "step": 0.3}, "step must be 1/k"),
                         ({"fraction": 0.2, "parts": ["width"]}, "parts must be"),
                         ({"fraction": 0.2, "select": "bleu"}, "select must be"),
                         ({"n_params": 10, "bytes": 10}, "exactly one budget")]:
        with pytest.raises(MiOptError, match=message):
            make_plan(profile, "joint-prune", bad, model, windows=tiny_windows(2, 8))


def test_mi_opt_plan_cli_rebuilds_windows_for_joint_prune(tmp_path, capsys):
    from mi_opt.cli import main

    folder = str(save_tiny(tmp_path / "model"))
    profile = hand_profile(layers=True)
    profile.model = {"spec": folder}
    profile.calibration = {"source": "handbook", "n_samples": 2, "seq_len": 16, "seed": 0}
    profile.save(tmp_path / "profile.json")
    out = tmp_path / "plan.json"
    assert main(["plan", str(tmp_path / "profile.json"), "--planner", "joint-prune", "--budget", "fraction=0.2",
                 "--option", "step=0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("* mix") == 1 and printed.count("  mix") == 5  # the chosen one marked, every one listed
    assert len(json.loads(out.read_text())["planner"]["candidates"]) == 6
    assert main(["plan", str(tmp_path / "profile.json"), "--planner", "width-prune", "--budget", "fraction=0.2",
                 "--option", "mode=free", "--out", str(out)]) == 0
    assert "prune MLP neurons" in capsys.readouterr().out
    assert json.loads(out.read_text())["neuron_mode"] == "free"


def test_layers_without_the_metric_rank_by_their_one_score():
    """Block influence measures no kl: with metric kl, layers still rank (by delta_loss)."""
    from mi_opt.policy.joint_prune import layer_metric
    from mi_opt.profile.importance import ImportanceProfile, UnitScore

    scores = {"L0": UnitScore(1.0, 0.0, None, None), "L1": UnitScore(2.0, 0.0, None, None),
              "L0.mlp.N0-7": UnitScore(0.1, 0.0, 0.2, 0.0)}
    profile = ImportanceProfile(model={"n_layers": 2}, method={"scorer": "merged"}, calibration={},
                                base_loss=None, scores=scores)
    assert layer_metric(profile, "kl") == "delta_loss"
    assert layer_metric(profile, "delta_loss") == "delta_loss"
