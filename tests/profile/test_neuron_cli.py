"""`mi-opt profile --units neurons` reaches every neuron scorer, with --neuron-group."""
import dataclasses
import json

import pytest
from tiny import save_tiny

from mi_opt.cli import main
from mi_opt.profile.scorers import SCORERS
from mi_opt.units import NEURON_GROUP


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("m") / "tiny"))


@pytest.mark.parametrize("scorer", ["ablation", "attribution", "activation", "wanda"])
def test_profile_scores_neuron_groups(tiny_folder, tmp_path, capsys, scorer):
    out = tmp_path / "run"
    code = main(["profile", tiny_folder, "--scorer", scorer, "--units", "neurons", "--neuron-group", "16",
                 "--data", "kjv", "--n-samples", "4", "--seq-len", "16", "--batch-size", "2", "--out", str(out)])
    assert code == 0
    profile = json.loads((out / "profile.json").read_text())
    assert sorted(profile["scores"]) == sorted(f"L{i}.mlp.N{j}-{j + 15}" for i in range(4) for j in range(0, 64, 16))
    assert profile["method"]["neuron_group"] == 16
    assert "least important neuron groups" in capsys.readouterr().out


def test_the_cli_default_is_every_scorers_default():
    for name in ("ablation", "attribution", "activation", "wanda"):
        fields = {f.name: f.default for f in dataclasses.fields(SCORERS.get(name).config_type)}
        assert fields["neuron_group"] == NEURON_GROUP, name
