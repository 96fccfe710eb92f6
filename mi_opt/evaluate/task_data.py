"""The generated items of mi-opt's own tasks, reproducible from a fixed seed.

`python -m mi_opt.evaluate.task_data` rewrites mi_opt/tasks/{arithmetic,name_lookup,sequences}
(test and few-shot files); tests check that the shipped files equal what this module generates,
so an item set can always be traced to the code and seed that made it. Everything here is
written for mi-opt (no third-party data; same license as mi-opt). capitals.jsonl is the one
hand-written task file (every UN member state and Vatican City).

Test items never appear in calibration text: `synthetic:arithmetic` (mi_opt/data.py) skips every
pair held out here (`held_out_sums`), and the few-shot examples are never test items.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parents[1] / "tasks"
SEED = 14              # one seed for every generated task (issue #14 set the sizes)
N_ITEMS = 240          # test items per generated task: standard error <= 0.033 at any accuracy

# -- arithmetic: one digit plus one digit, or a one-digit number and one below 30 ---------------
ARITHMETIC_FEWSHOT = [(2, 3), (14, 5), (7, 6)]


def arithmetic_items(n: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    """n distinct sums a + b (one operand below 10, the other below 30), few-shot pairs excluded."""
    space = sorted({(a, b) for a in range(30) for b in range(30) if min(a, b) < 10} - set(ARITHMETIC_FEWSHOT))
    pairs = random.Random(seed).sample(space, n)
    return [{"a": a, "b": b, "answer": str(a + b)} for a, b in pairs]


def held_out_sums(path: Path = TASK_DIR / "arithmetic.jsonl") -> set[tuple[int, int]]:
    """Pairs (a, b) of the arithmetic test items, both orders: what calibration text must not hold."""
    pairs = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            pairs |= {(row["a"], row["b"]), (row["b"], row["a"])}
    return pairs


# -- name lookup: in-context retrieval of who holds which object in a short passage -------------
NAMES = ["Maria", "Tom", "Ahmed", "Lena", "Kenji", "Sofia", "David", "Amara", "Oscar", "Priya", "Lucas", "Emma",
         "Ivan", "Fatima", "Noah", "Chloe", "Mateo", "Hannah", "Omar", "Grace", "Leo", "Nadia", "Samuel", "Alice"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
OBJECTS = ["key", "box", "book", "cup", "hat", "bag", "lamp", "coin"]
LOOKUP_FEWSHOT_SEED = SEED + 1000  # few-shot passages come from their own stream: never a test item


def _passage(rng: random.Random) -> dict:
    holders = rng.sample(NAMES, rng.randint(3, 5))
    things = [f"{c} {o}" for c, o in zip(rng.sample(COLORS, len(holders)), rng.sample(OBJECTS, len(holders)))]
    asked = rng.randrange(len(holders))
    # "The red key is with Maria.": the asked object's words come right before the answer, so the
    # task is the look-back-and-copy that few-shot prompting relies on, not a reordering puzzle.
    text = " ".join(f"The {thing} is with {name}." for name, thing in zip(holders, things))
    return {"passage": text, "question": f"Who has the {things[asked]}?",
            "cue": f"The {things[asked]} is with", "answer": holders[asked]}


def lookup_items(n: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    """n distinct passages of 3-5 people each holding a different coloured object; the question
    asks who holds one of them (answer position uniform, so no "always the first name" shortcut)."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        item = _passage(rng)
        key = (item["passage"], item["question"])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def lookup_fewshot(k: int = 3) -> list[dict]:
    test = {(i["passage"], i["question"]) for i in lookup_items()}
    return [i for i in lookup_items(k + 10, LOOKUP_FEWSHOT_SEED) if (i["passage"], i["question"]) not in test][:k]


# -- sequences: the next item of a well-known sequence ----------------------------------------
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]
PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def _cyclic(items: list[str], wrap: bool):
    def make(rng: random.Random, length: int) -> list[str]:
        start = rng.randrange(len(items) if wrap else len(items) - length)
        return [items[(start + i) % len(items)] for i in range(length + 1)]
    return make


def _counting(step: int, down: bool = False):
    def make(rng: random.Random, length: int) -> list[str]:
        start = rng.randrange(10, 100) if down else step * rng.randrange(1, 60)  # never below zero
        values = [start - step * i if down else start + step * i for i in range(length + 1)]
        return [str(v) for v in values]
    return make


# kind -> generator(rng, length) of length + 1 items; the last one is the answer
SEQUENCE_KINDS = {
    "weekdays": _cyclic(WEEKDAYS, wrap=True), "months": _cyclic(MONTHS, wrap=True),
    "letters": _cyclic(LETTERS, wrap=False), "number words": _cyclic(NUMBER_WORDS, wrap=False),
    "ordinals": _cyclic(ORDINALS, wrap=False), "planets": _cyclic(PLANETS, wrap=False),
    "count by 1": _counting(1), "count by 2": _counting(2), "count by 5": _counting(5),
    "count by 10": _counting(10), "count down": _counting(1, down=True),
}
SEQUENCE_FEWSHOT = [["Monday", "Tuesday", "Wednesday", "Thursday"], ["2", "4", "6", "8", "10"],
                    ["A", "B", "C", "D"]]


def sequence_items(n: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    """n distinct prompts of 3-5 shown items from the kinds above, in turn; answer = the next item."""
    rng, seen, out = random.Random(seed), {tuple(s) for s in SEQUENCE_FEWSHOT}, []
    kinds = list(SEQUENCE_KINDS)
    attempts = 0
    while len(out) < n:
        kind = kinds[attempts % len(kinds)]
        attempts += 1
        seq = SEQUENCE_KINDS[kind](rng, rng.randint(3, 5))
        if tuple(seq) not in seen:
            seen.add(tuple(seq))
            out.append({"kind": kind, "shown": ", ".join(seq[:-1]), "answer": seq[-1]})
    return out


def _fewshot_sequences() -> list[dict]:
    return [{"kind": "example", "shown": ", ".join(s[:-1]), "answer": s[-1]} for s in SEQUENCE_FEWSHOT]


def generated_files() -> dict[str, list[dict]]:
    """File name under mi_opt/tasks -> its rows, for every generated task."""
    return {"arithmetic.jsonl": arithmetic_items(),
            "arithmetic_fewshot.jsonl": [{"a": a, "b": b, "answer": str(a + b)} for a, b in ARITHMETIC_FEWSHOT],
            "name_lookup.jsonl": lookup_items(), "name_lookup_fewshot.jsonl": lookup_fewshot(),
            "sequences.jsonl": sequence_items(), "sequences_fewshot.jsonl": _fewshot_sequences()}


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_all(folder: Path = TASK_DIR) -> list[Path]:
    out = []
    for name, rows in generated_files().items():
        (folder / name).write_text(jsonl(rows), encoding="utf-8")
        out.append(folder / name)
    return out


if __name__ == "__main__":
    for path in write_all():
        print(path)
