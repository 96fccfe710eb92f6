"""Healing text: calibration windows only, cycled when the corpus is small, never evaluation
windows or task items."""
from __future__ import annotations

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from mi_opt.data import token_windows
from mi_opt.errors import MiOptError
from mi_opt.heal import HealConfig
from mi_opt.heal.data import TASK_DIR, training_windows


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _rows(windows: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r.tolist()) for r in windows}


def test_training_windows_are_calibration_windows_never_evaluation_ones(tokenizer):
    config = HealConfig(source="kjv", seq_len=32)
    windows, record = training_windows(tokenizer, None, config, 40)
    calibration = token_windows(tokenizer, "kjv", 10_000, 32, split="calibration", cycle=True)
    evaluation = token_windows(tokenizer, "kjv", 500, 32, split="evaluation")
    assert _rows(windows) <= _rows(calibration)
    assert not _rows(windows) & _rows(evaluation)
    assert record["split"] == "calibration" and record["tokens"] == 40 * 32


def test_a_small_corpus_is_cycled_in_new_orders(tokenizer):
    cycled = token_windows(tokenizer, "kjv", 1_000, 2048, split="calibration", cycle=True)
    epoch = len(_rows(cycled))  # every calibration window, each once per epoch
    assert len(cycled) == 1_000 > 2 * epoch
    first, second = cycled[:epoch], cycled[epoch:2 * epoch]
    assert len(_rows(first)) == epoch and _rows(first) == _rows(second) and not torch.equal(first, second)


def test_task_files_are_refused_as_healing_text(tokenizer):
    task_file = next(TASK_DIR.glob("*.jsonl"))
    with pytest.raises(MiOptError, match="evaluation task file"):
        training_windows(tokenizer, None, HealConfig(source=str(task_file)), 4)
    with pytest.raises(MiOptError, match="evaluation task file"):
        training_windows(tokenizer, None, HealConfig(source=f"kjv+{task_file}"), 4)


def test_self_generated_windows_come_from_the_teacher_and_calibration_prompts(tokenizer):
    teacher = tiny_model("llama")
    config = HealConfig(source="kjv", seq_len=24, self_generated=0.5)
    windows, record = training_windows(tokenizer, teacher, config, 8, progress=False)
    assert windows.shape == (8, 24) and record["self_generated_windows"] == 4 and record["prose_windows"] == 4
    prompts = token_windows(tokenizer, "kjv", 4, 24, split="calibration", seed=config.seed + 1, cycle=True,
                            avoid_eval_len=config.eval_seq_len)[:, :record["generation"]["prompt_tokens"]]
    calibration = _rows(token_windows(tokenizer, "kjv", 10_000, 24, split="calibration", cycle=True))
    generated = [r for r in windows if tuple(r.tolist()) not in calibration]
    assert len(generated) == 4
    assert _rows(torch.stack(generated)[:, :prompts.shape[1]]) == _rows(prompts)
    again, _ = training_windows(tokenizer, teacher, config, 8, progress=False)
    assert torch.equal(windows, again)  # seeded: the same text every time


@pytest.mark.parametrize("body, eval_body", [(16, 256), (255, 255), (300, 256), (31, 7)])
def test_windows_touching_an_evaluation_window_of_another_length_are_found(body, eval_body):
    from mi_opt.data import EVAL_EVERY, _touches_evaluation

    n = 200
    got = _touches_evaluation(n, body, eval_body).tolist()
    for i in range(n):
        tokens = range(i * body, (i + 1) * body)
        assert got[i] == any((t // eval_body) % EVAL_EVERY == EVAL_EVERY - 1 for t in tokens), i


def test_healing_windows_of_another_length_hold_no_evaluation_token(tokenizer):
    windows, record = training_windows(tokenizer, None, HealConfig(source="kjv", seq_len=40, eval_seq_len=256), 300)
    assert record["avoids_evaluation_windows_of"] == 256
    every = _rows(token_windows(tokenizer, "kjv", 10_000, 40, split="calibration", cycle=True))
    allowed = _rows(token_windows(tokenizer, "kjv", 10_000, 40, split="calibration", cycle=True,
                                  avoid_eval_len=256))
    assert _rows(windows) <= allowed < every
