import copy

import pytest
import torch

from mi_opt.errors import MiOptError
from mi_opt.evaluate import EvalConfig, EvalResult, SpeedConfig, evaluate

FAST = dict(ppl_samples=2, ppl_seq_len=32, ppl_batch_size=2, task_limit=2, task_batch_size=4,
            speed=SpeedConfig(prompt_len=8, new_tokens=3, warmup=0, repetitions=2))


def test_evaluate_all_parts_and_round_trip(smol_tiny, tmp_path):
    model, tok = smol_tiny
    result = evaluate(model, tok, EvalConfig(tasks=("miopt_facts_mc",), threads=1, **FAST), spec="tiny",
                      progress=False)
    assert result.perplexity["perplexity"] > 1 and result.tasks["miopt_facts_mc"]["n"] == 2
    assert result.speed["decode_tokens_per_s"]["median"] > 0
    assert result.settings["threads"] == 1 == result.machine["torch_threads"]
    assert set(result.wall_time_s) == {"perplexity", "tasks", "speed"}
    path = result.save(tmp_path / "eval.json")
    back = EvalResult.load(path)
    assert back.to_dict() == result.to_dict()
    assert back.to_dict()["schema"] == "mi-opt/eval" and "torch" in back.versions


def test_threads_are_restored(smol_tiny):
    model, tok = smol_tiny
    before = torch.get_num_threads()
    evaluate(model, tok, EvalConfig(parts=("perplexity",), threads=1, **FAST), progress=False)
    assert torch.get_num_threads() == before


def test_identical_models_score_equal_and_damage_scores_worse(smol_tiny):
    model, tok = smol_tiny
    config = EvalConfig(parts=("perplexity",), **FAST)
    a = evaluate(model, tok, config, progress=False)
    b = evaluate(copy.deepcopy(model), tok, config, progress=False)
    assert a.perplexity == b.perplexity and a.model["fingerprint"] == b.model["fingerprint"]
    damaged = copy.deepcopy(model)
    with torch.no_grad():  # the embedding scaled to noise: predictions no longer depend on the text
        damaged.model.embed_tokens.weight.normal_(0, 5)
        damaged.lm_head.weight.mul_(4)
    c = evaluate(damaged, tok, config, progress=False)
    assert c.perplexity["perplexity"] > a.perplexity["perplexity"]
    assert c.model["fingerprint"] != a.model["fingerprint"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(parts=("perplexity", "accuracy")), "unknown evaluation part"),
    (dict(ppl_samples=0), "ppl_samples"),
    (dict(tasks=()), "at least one task"),
    (dict(task_limit=0), "task_limit"),
    (dict(threads=0), "threads"),
    (dict(speed={"repetitions": 0}), "repetitions"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(MiOptError, match=match):
        EvalConfig(**kwargs)
