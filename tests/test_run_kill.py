"""SIGKILL `mi-opt run` during profiling and during export: the next run finishes with the outputs
of an uninterrupted run and leaves no temporaries behind (issue 12; mid-heal: tests/heal/test_kill.py).

The kill points are observed, not guessed with sleeps: the run folder's recipe.yaml is written
just before the profile stage starts (profiling then takes seconds: naive ablation of every
unit), and an export works in a hidden `.checkpoint.tmp-<pid>-*` folder until it is renamed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tiny import save_tiny, tiny_windows

RUN = "k"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(recipe, environment, the outputs of an uninterrupted run)."""
    root = tmp_path_factory.mktemp("kill")
    folder = save_tiny(root / "tiny")
    recipe = root / "k.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": RUN, "model": {"name": str(folder)},
        "data": {"calibration": "kjv", "n_samples": 24, "seq_len": 64},
        "profile": {"scorer": "ablation", "options": {"engine": "naive", "batch_size": 1}},
        "policy": {"planner": "layer-skip", "options": {"n_drop": 1}},
        "evaluate": {"parts": ["perplexity"], "ppl_samples": 2, "ppl_seq_len": 16}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MI_OPT_CACHE": str(root / "cache")}
    whole = _start(recipe, root / "whole", env)
    assert whole.wait(timeout=600) == 0, whole.stderr.read().decode()[-2000:]
    return recipe, env, root / "whole"


def _start(recipe: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mi_opt", "run", str(recipe), "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(process: subprocess.Popen, underway) -> bool:
    """SIGKILL `process` as soon as underway() is true; False if it finished first."""
    deadline = time.monotonic() + 600
    while not underway():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def _rerun(recipe: Path, out: Path, env: dict) -> None:
    again = _start(recipe, out, env)
    assert again.wait(timeout=600) == 0, again.stderr.read().decode()[-2000:]


def _checkpoint_logits(checkpoint: Path) -> torch.Tensor:
    from mi_opt.export import load_compressed

    with torch.no_grad():
        return load_compressed(checkpoint)(tiny_windows(2, 16)).logits


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def _assert_same_outputs(out: Path, whole: Path) -> None:
    run, reference = out / RUN, whole / RUN
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference.iterdir())
    for name in ("eval_original.json", "eval_compressed.json"):
        assert (json.loads((run / name).read_text())["perplexity"]
                == json.loads((reference / name).read_text())["perplexity"]), name
    assert json.loads((run / "profile.json").read_text())["scores"] == \
        json.loads((reference / "profile.json").read_text())["scores"]
    assert json.loads((run / "plan.json").read_text())["drop_layers"] == \
        json.loads((reference / "plan.json").read_text())["drop_layers"]
    weights, expected = _weights(run / "checkpoint"), _weights(reference / "checkpoint")
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    assert torch.equal(_checkpoint_logits(run / "checkpoint"), _checkpoint_logits(reference / "checkpoint"))


def _hidden(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob("*") if p.name.startswith(".")]


def test_a_run_killed_during_profiling_reruns_to_the_uninterrupted_result(setup, tmp_path):
    recipe, env, whole = setup
    out = tmp_path / "out"
    killed = _start(recipe, out, env)
    assert _kill_when(killed, lambda: (out / RUN / "recipe.yaml").exists()), "the run ended before profiling"
    assert not (out / RUN / "profile.json").exists(), "the kill came after profiling, not during it"

    _rerun(recipe, out, env)
    _assert_same_outputs(out, whole)
    assert not _hidden(out)


def test_a_run_killed_during_export_reruns_to_the_uninterrupted_result(setup, tmp_path):
    recipe, env, whole = setup
    for attempt in range(3):  # an export of the tiny model takes a fraction of a second: it may be missed
        out = tmp_path / f"out{attempt}"
        killed = _start(recipe, out, env)
        if _kill_when(killed, lambda: any((out / RUN).glob(".checkpoint.tmp-*"))) and \
                not (out / RUN / "checkpoint").exists():
            break
    else:
        pytest.fail("three runs finished their export before it could be killed")
    left = _hidden(out)
    assert left and all(name.startswith(f"{RUN}/.checkpoint.tmp-{killed.pid}-") for name in left), left

    _rerun(recipe, out, env)
    _assert_same_outputs(out, whole)
    assert not _hidden(out)  # the dead export's temporary folder went with the next export
