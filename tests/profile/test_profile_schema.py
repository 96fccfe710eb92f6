"""Profile schema v2: kl may be None (scorers that measure no KL), version-1 files still load."""
import json

import pytest
from tiny import tiny_model, tiny_windows

from mi_opt.errors import MiOptError
from mi_opt.policy.base import unit_scores
from mi_opt.profile.importance import VERSION, ImportanceProfile
from mi_opt.profile.scorers import run_scorer


def _as_version_1(profile: ImportanceProfile, path, copy_kl: bool):
    """What mi-opt 1 wrote: every score with a kl, a baseline's being a copy of its score."""
    d = profile.to_dict()
    d["version"] = 1
    for s in d["scores"].values():
        if copy_kl:
            s["kl"], s["kl_se"] = s["delta_loss"], s["delta_loss_se"]
    path.write_text(json.dumps(d))
    return path


def test_baselines_store_no_kl_and_round_trip(tmp_path):
    profile = run_scorer("weight_magnitude", tiny_model("llama"), None, {"unit_kinds": ["layer", "head"]})
    assert VERSION == 2 and profile.to_dict()["version"] == 2
    assert all(s.kl is None and s.kl_se is None for s in profile.scores.values())
    assert not profile.has_metric("kl") and profile.has_metric("delta_loss")
    again = ImportanceProfile.load(profile.save(tmp_path / "p.json"))
    assert again.scores == profile.scores


def test_version_1_files_load_and_a_baselines_copied_kl_is_dropped(tmp_path):
    model, windows = tiny_model("llama"), tiny_windows(4, 8)
    baseline = run_scorer("block_influence", model, windows, progress=False)
    old = ImportanceProfile.load(_as_version_1(baseline, tmp_path / "bi.json", copy_kl=True))
    assert old.scores == baseline.scores  # the copied kl is not a KL: read as "not measured"
    causal = run_scorer("ablation", model, windows, {"unit_kinds": ["layer"]}, progress=False)
    old = ImportanceProfile.load(_as_version_1(causal, tmp_path / "abl.json", copy_kl=False))
    assert old.scores == causal.scores and old.has_metric("kl")


def test_a_planner_asking_for_kl_from_a_profile_without_it_is_told_why():
    profile = run_scorer("random", tiny_model("llama"), None, {"unit_kinds": ["layer"]})
    assert set(unit_scores(profile, "layer", "delta_loss")) == {"L0", "L1", "L2", "L3"}
    with pytest.raises(MiOptError, match="scorer 'random' measures no kl.*metric 'delta_loss'"):
        unit_scores(profile, "layer", "kl")


def test_a_loaded_profile_still_needs_a_delta_loss(tmp_path):
    d = run_scorer("random", tiny_model("llama"), None, {"unit_kinds": ["layer"]}).to_dict()
    d["scores"]["L0"]["delta_loss"] = None
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(MiOptError, match="delta_loss must be a number"):
        ImportanceProfile.load(tmp_path / "p.json")
