"""The evaluator on the real SmolLM2-135M with a small budget (a minute or so on 2 cores)."""
from __future__ import annotations

import copy

import pytest
import torch

from mi_opt.evaluate import DEFAULT_TASKS, EvalConfig, SpeedConfig, evaluate

pytestmark = pytest.mark.integration

CONFIG = EvalConfig(ppl_samples=2, ppl_seq_len=128, ppl_batch_size=2, task_limit=5, task_batch_size=8,
                    speed=SpeedConfig(prompt_len=32, new_tokens=4, warmup=1, repetitions=2))


def test_smollm2_small_budget(smollm2):
    model, tok = smollm2
    result = evaluate(model, tok, CONFIG, spec="smollm2-135m", progress=False)
    ppl = result.perplexity
    # A trained model predicts English far better than a uniform guess over 49k tokens.
    assert 1 < ppl["perplexity"] < len(tok) / 100 and 0 < ppl["bits_per_byte"] < 3
    assert set(result.tasks) == set(DEFAULT_TASKS)
    for task in result.tasks.values():
        assert task["n"] == 5 and 0 <= task["metrics"][task["primary"]] <= 1
        assert task["score"]["interval"][0] <= task["metrics"][task["primary"]] <= task["score"]["interval"][1]
    # it continues well-known sequences (0.91 on all 240 items; the first capitals are hard ones)
    assert result.tasks["miopt_sequences"]["metrics"]["exact_match"] > 0
    speed = result.speed
    assert speed["parameters"] == sum(p.numel() for p in model.parameters())
    assert speed["decode_tokens_per_s"]["median"] > 0 and speed["peak_memory_bytes"] > speed["memory_bytes"]

    damaged = copy.deepcopy(model)
    with torch.no_grad():
        for layer in damaged.model.layers[:4]:
            layer.mlp.down_proj.weight.zero_()
    worse = evaluate(damaged, tok, EvalConfig(parts=("perplexity",), ppl_samples=2, ppl_seq_len=128),
                     progress=False)
    assert worse.perplexity["perplexity"] > ppl["perplexity"]
