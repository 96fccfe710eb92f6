"""The shipped task items are what the seeded generator makes, and never meet calibration text."""
import json

import pytest

from mi_opt.data import _synthetic
from mi_opt.evaluate.task_data import TASK_DIR, generated_files, held_out_sums, jsonl


@pytest.mark.parametrize("name", sorted(generated_files()))
def test_shipped_files_equal_the_generator(name):
    assert (TASK_DIR / name).read_text(encoding="utf-8") == jsonl(generated_files()[name]), \
        f"{name} differs from mi_opt/evaluate/task_data.py: run `python -m mi_opt.evaluate.task_data`"


def _rows(name):
    return [json.loads(line) for line in (TASK_DIR / name).read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("task", ["arithmetic", "capitals", "name_lookup", "sequences"])
def test_items_are_distinct_and_few_shot_examples_are_not_test_items(task):
    test = [json.dumps(r, sort_keys=True) for r in _rows(f"{task}.jsonl")]
    assert len(set(test)) == len(test)
    assert not set(test) & {json.dumps(r, sort_keys=True) for r in _rows(f"{task}_fewshot.jsonl")}


def test_synthetic_arithmetic_never_holds_a_test_sum():
    held_out = held_out_sums()
    assert len(held_out) >= 2 * 200 - 50   # both orders of 240 items, minus the symmetric ones
    lines = [line for line in _synthetic("arithmetic").splitlines() if line.strip()]
    assert len(lines) == 6000
    for line in lines:
        a, rest = line.split(" + ")
        assert (int(a), int(rest.split(" = ")[0])) not in held_out, line


def test_answers_are_right():
    for row in _rows("arithmetic.jsonl"):
        assert int(row["answer"]) == row["a"] + row["b"] and min(row["a"], row["b"]) < 10
    for row in _rows("name_lookup.jsonl"):
        assert f"{row['cue']} {row['answer']}." in row["passage"]
    capitals = _rows("capitals.jsonl")
    assert len(capitals) == 190 + 1   # every UN member state but the 3 few-shot ones, and Vatican City
    assert all(r["capital"] == r["answers"][0] for r in capitals)
    assert len({r["country"] for r in capitals}) == len(capitals)
