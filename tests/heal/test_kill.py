"""SIGKILL `mi-opt run` in the middle of a heal: the next run resumes from the last distillation
checkpoint, ends with the same healed model as an uninterrupted run, and leaves nothing behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml
from tiny import save_tiny

HEAL = {"method": "distill", "train": "localized", "source": "kjv", "steps": 12, "batch_size": 2, "seq_len": 16,
        "eval_seq_len": 16, "save_steps": 2, "lr": 1e-3}


def _recipe(tmp_path, folder) -> str:
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump({
        "name": "k", "model": {"name": str(folder)},
        "data": {"calibration": "kjv", "n_samples": 4, "seq_len": 16},
        "profile": {"scorer": "block_influence", "options": {"batch_size": 2}},
        "policy": {"planner": "layer-skip", "options": {"n_drop": 1}}, "heal": HEAL,
        "evaluate": {"parts": ["perplexity"], "ppl_samples": 2, "ppl_seq_len": 16}}))
    return str(path)


def _run(recipe: str, out, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mi_opt", "run", recipe, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)


def _healed_perplexity(out) -> float:
    return json.loads((out / "k" / "eval_healed.json").read_text())["perplexity"]["perplexity"]


def test_a_run_killed_mid_heal_resumes_to_the_uninterrupted_result(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    recipe = _recipe(tmp_path, folder)
    whole = _run(recipe, tmp_path / "a")
    assert whole.wait(timeout=600) == 0, whole.stderr.read().decode()[-2000:]

    killed = _run(recipe, tmp_path / "b")
    deadline = time.monotonic() + 600
    while not list((tmp_path / "b" / "k").glob("heal-work-*/checkpoint-*/trainer_state.json")):
        assert killed.poll() is None, "the run finished before it could be killed mid-heal"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "b" / "k" / "heal.json").exists()

    resumed = _run(recipe, tmp_path / "b")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    assert abs(_healed_perplexity(tmp_path / "b") - _healed_perplexity(tmp_path / "a")) < 1e-4
    heal = json.loads((tmp_path / "b" / "k" / "heal.json").read_text())
    assert heal["distill"]["resumed_from_step"] >= 2
    left = [p.name for p in (tmp_path / "b" / "k").iterdir() if p.name.startswith((".", "heal-work"))]
    assert not left
