from mi_opt.evaluate.paired import generative_tasks, pairable_perplexity, perplexity_change, result_changes
from mi_opt.evaluate.result import EvalResult
from mi_opt.evaluate.stats import perplexity_summary, score_summary


def _task(scores, output_type):
    n = len(scores)
    return {"metrics": {"exact_match": sum(scores) / n}, "primary": "exact_match", "output_type": output_type,
            "higher_is_better": {"exact_match": True}, "n": n, "score": score_summary(scores),
            "items": {"doc_id": list(range(n)), "score": list(scores), "prompt_hash": [f"h{i}" for i in range(n)]}}


def _result(gen_a, gen_b, mc, nll):
    tokens = [31] * len(nll)
    ppl = {"perplexity": 2.718 ** (sum(nll) / sum(tokens)), "windows_hash": "w", "window_nll_sum": list(nll),
           "window_tokens": tokens, **perplexity_summary(nll, tokens)}
    tasks = {"a": _task(gen_a, "generate_until"), "b": _task(gen_b, "generate_until"),
             "mc": _task(mc, "multiple_choice")}
    return EvalResult(model={"spec": "m"}, settings={}, perplexity=ppl, tasks=tasks)


NLL = [90.0 + i % 7 for i in range(16)]


def test_generative_tasks_are_those_that_generate():
    assert generative_tasks(_result([1, 0], [1, 0], [1, 0], NLL)) == ["a", "b"]


def test_identical_results_change_nothing_significantly():
    r = _result([1, 0] * 50, [0, 1, 1] * 30, [1, 0, 0] * 20, NLL)
    changes = result_changes(r, r)
    assert set(changes) == {"a", "b", "mc", "perplexity", "generative_mean"}
    assert all(not c["significant"] and c["change"] == 0 for c in changes.values())


def test_a_generative_loss_is_found_and_the_mean_covers_generative_tasks_only():
    base = _result([1] * 100, [1] * 90, [1, 0] * 30, NLL)
    worse = _result([1] * 40 + [0] * 60, [1] * 90, [0] * 60, [x + 20 for x in NLL])
    changes = result_changes(base, worse)
    assert changes["a"]["significant"] and abs(changes["a"]["change"] + 0.6) < 1e-9
    assert changes["perplexity"]["significant"] and changes["perplexity"]["change"] > 0
    # mean of a (-0.6) and b (0): the multiple-choice task's -0.5 is not part of it
    assert abs(changes["generative_mean"]["change"] + 0.3) < 1e-9 and changes["generative_mean"]["significant"]


def test_results_without_per_item_data_give_reasons_not_verdicts():
    base = _result([1, 0] * 10, [1, 0] * 10, [1, 0] * 10, NLL)
    bare = EvalResult(model={"spec": "m"}, settings={}, perplexity={"perplexity": 3.0},
                      tasks={name: {k: v for k, v in t.items() if k != "items"} for name, t in base.tasks.items()})
    changes = result_changes(base, bare)
    assert "reason" in changes["a"] and "reason" in changes["perplexity"] and changes["generative_mean"] is None


def test_change_text_shows_interval_and_mark_and_none_when_unpaired():
    from mi_opt.evaluate.paired import change_text

    assert change_text({"change": -1.234, "interval": [-2.0, -0.0004], "significant": True}, 1) == "-1.2 [-2.0, 0.0]*"
    assert change_text({"change": 0.5, "interval": [-0.1, 1.1], "significant": False}, 2) == "+0.50 [-0.10, 1.10]"
    assert change_text({"reason": "no per-item results"}, 1) is None and change_text(None, 1) is None


def test_a_stored_perplexity_keeps_what_pairing_needs_and_nothing_else():
    full = {**_result([1], [1], [1], NLL).perplexity, "n_tokens": 496, "source": "handbook"}
    worse = {**full, "window_nll_sum": [x + 5 for x in NLL]}
    stored, stored_worse = pairable_perplexity(full), pairable_perplexity(worse)
    assert "source" not in stored and stored["window_nll_sum"] == NLL
    assert perplexity_change(stored, stored_worse) == perplexity_change(full, worse)
    assert perplexity_change(stored, stored_worse)["significant"]
