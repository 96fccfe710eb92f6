import json

import pytest
from tiny import save_tiny

from mi_opt.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("m") / "tiny"))


def test_profile_writes_json_and_plots(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["profile", tiny_folder, "--data", "kjv", "--n-samples", "4", "--seq-len", "16",
                 "--batch-size", "2", "--ablation", "mean", "--out", str(out)])
    assert code == 0
    profile = json.loads((out / "profile.json").read_text())
    assert profile["schema"] == "mi-opt/importance-profile" and profile["version"] == 2
    assert profile["calibration"]["source"] == "kjv" and profile["method"]["ablation"] == "mean"
    assert len(profile["scores"]) == 4 * 9
    assert (out / "heads.png").exists() and (out / "layers.png").exists()
    assert "least important layers" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["no-such-model"], "unknown model name"),
    (["{tiny}", "--seq-len", "4096"], "exceeds the model's context"),
    (["{tiny}", "--n-samples", "100000"], "calibration windows"),
    (["{tiny}", "--units", "layer,neuron"], "unknown unit kind"),
])
def test_bad_inputs_fail_cleanly_and_write_nothing(tiny_folder, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code = main(["profile", *[a.replace("{tiny}", tiny_folder) for a in args], "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mi-opt profile: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not out.exists()


def test_models_verb_lists_bundled(capsys):
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


def test_torchrun_two_processes_match_one(tiny_folder, tmp_path):
    """`torchrun --nproc_per_node 2 -m mi_opt profile` gives the one-process profile (gloo, CPU)."""
    import os
    import subprocess
    import sys

    args = [tiny_folder, "--data", "kjv", "--n-samples", "4", "--seq-len", "16", "--batch-size", "2",
            "--threads", "1"]
    assert main(["profile", *args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mi_opt", "profile", *args, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "profile.json").read_text())["scores"]
    two = json.loads((tmp_path / "two" / "profile.json").read_text())["scores"]
    assert one.keys() == two.keys()
    for key in one:
        assert abs(one[key]["delta_loss"] - two[key]["delta_loss"]) < 1e-5
        assert abs(one[key]["kl"] - two[key]["kl"]) < 1e-5
    assert len(list((tmp_path / "two" / "shards").glob("shard-*.json"))) == 2


def test_profile_of_a_corrupted_checkpoint_stops_with_one_line(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    folder = save_tiny(tmp_path / "broken")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    out = tmp_path / "run"
    code = main(["profile", str(folder), "--data", "kjv", "--n-samples", "4", "--seq-len", "16",
                 "--batch-size", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "base loss on calibration batch 0 is not finite" in err[-1]
    assert not (out / "profile.json").exists()


def test_profile_reaches_any_registered_scorer(tiny_folder, tmp_path, capsys):
    out = tmp_path / "wm"
    code = main(["profile", tiny_folder, "--scorer", "weight_magnitude", "--option", "norm=l1",
                 "--units", "layer,head", "--data", "kjv", "--n-samples", "2", "--seq-len", "16", "--out", str(out)])
    assert code == 0
    profile = json.loads((out / "profile.json").read_text())
    assert profile["method"]["scorer"] == "weight_magnitude" and profile["method"]["norm"] == "l1"
    assert len(profile["scores"]) == 4 * 5
    assert main(["profile", tiny_folder, "--option", "batch_size=two", "--out", str(tmp_path / "x")]) == 2
    assert "'batch_size' must be an integer" in capsys.readouterr().err


def test_profile_defaults_are_the_dataclass_defaults():
    import argparse

    from mi_opt.cli.profile import add_arguments
    from mi_opt.recipe import DataSection

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.n_samples, args.seq_len, args.data, args.seed) == (DataSection().n_samples, DataSection().seq_len,
                                                                    DataSection().calibration, DataSection().seed)
