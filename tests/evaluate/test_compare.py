import json

import pytest
from PIL import Image

from mi_opt.evaluate.compare import Comparison, _front, metrics_table
from mi_opt.evaluate.result import EvalResult


def _result(ppl=10.0, acc=0.5, ms=20.0, tok_s=50.0, size=100e6, **settings):
    speed = {"prefill_ms": {"median": ms}, "ttft_ms": {"median": ms}, "decode_tokens_per_s": {"median": tok_s},
             "decode_ms_per_token": {"median": 1e3 / tok_s}, "peak_memory_bytes": 2 * size,
             "parameters": size / 4, "size_bytes": size, "size_kind": "memory"}
    tasks = {"t_mc": {"metrics": {"acc": acc}, "primary": "acc", "higher_is_better": {"acc": True}, "n": 10},
             "t_gen": {"metrics": {"exact_match": acc / 2}, "primary": "exact_match",
                       "higher_is_better": {"exact_match": True}, "n": 10}}
    return EvalResult(model={"spec": "m"}, settings={"seed": 0, **settings},
                      perplexity={"perplexity": ppl, "bits_per_byte": ppl / 10}, tasks=tasks, speed=speed)


def test_identical_results_compare_equal():
    comp = Comparison(["a", "b"], [_result(), _result()])
    for row in comp.rows:
        assert row.values[0] == row.values[1]
        assert row.relation(1) == (0 if row.kind == "delta" else 1)


def test_deltas_speedups_and_ratios():
    rows = {m.name: m for m in metrics_table([_result(), _result(ppl=12, acc=0.4, ms=10, tok_s=100, size=50e6)])}
    assert rows["perplexity"].relation(1) == pytest.approx(2)
    assert rows["t_mc acc"].relation(1) == pytest.approx(-0.1)
    assert rows["task mean"].values == [pytest.approx(0.375), pytest.approx(0.3)]
    assert rows["prefill ms"].relation(1) == pytest.approx(2)          # twice as fast
    assert rows["decode tokens/s"].relation(1) == pytest.approx(2)
    assert rows["size MB"].relation(1) == pytest.approx(0.5)
    assert rows["peak memory MB"].relation(1) == pytest.approx(0.5)


def test_outputs_written(tmp_path):
    comp = Comparison(["base", "small", "tiny"], [_result(), _result(ppl=12, acc=0.45, ms=10, size=50e6),
                                                  _result(ppl=30, acc=0.2, ms=15, size=70e6, seed=1)])
    paths = comp.write(tmp_path / "cmp")
    md = paths["markdown"].read_text()
    assert "| metric | base | small | tiny |" in md and "(x2.00)" in md
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == "mi-opt/compare" and data["baseline"] == "base"
    assert any("seed" in n for n in data["notes"])       # unlike settings are flagged
    row = next(r for r in data["rows"] if r["metric"] == "perplexity")
    assert row["vs_baseline"]["small"] == pytest.approx(2)
    with Image.open(paths["plot"]) as img:
        assert img.size[0] > 600 and img.size[1] > 300
    text = comp.to_text()
    assert text.splitlines()[0].split() == ["metric", "base", "small", "tiny"]


def test_missing_parts_show_as_na(tmp_path):
    partial = EvalResult(model={}, settings={}, perplexity={"perplexity": 9.0, "bits_per_byte": 1.0})
    comp = Comparison(["full", "ppl-only"], [_result(), partial])
    assert "n/a" in comp.to_text()
    comp.write(tmp_path)  # the plot still renders with the points it has


def test_pareto_front():
    pts = [(1, 0.5), (2, 0.6), (3, 0.55), (0.5, 0.1)]
    assert _front(pts, higher_is_better=True) == [(0.5, 0.1), (1, 0.5), (2, 0.6)]
    assert _front([(1, 10.0), (2, 8.0), (3, 9.0)], higher_is_better=False) == [(1, 10.0), (2, 8.0)]


def _itemized(scores, nll):
    from mi_opt.evaluate.stats import perplexity_summary, score_summary

    n = len(scores)
    task = {"metrics": {"exact_match": sum(scores) / n}, "primary": "exact_match",
            "higher_is_better": {"exact_match": True}, "n": n, "score": score_summary(scores),
            "items": {"doc_id": list(range(n)), "score": list(scores), "prompt_hash": [f"h{i}" for i in range(n)]}}
    tokens = [31] * len(nll)
    ppl = {"perplexity": 2.718 ** (sum(nll) / sum(tokens)), "bits_per_byte": 1.0,
           "bits_per_byte_interval": [0.9, 1.1], "windows_hash": "w",
           "window_nll_sum": list(nll), "window_tokens": tokens, **perplexity_summary(nll, tokens)}
    return EvalResult(model={"spec": "m"}, settings={}, perplexity=ppl, tasks={"t": task})


def test_identical_itemized_results_show_intervals_and_no_significance():
    scores, nll = [1, 0] * 50, [90.0 + i % 7 for i in range(16)]
    comp = Comparison(["a", "b"], [_itemized(scores, nll), _itemized(scores, nll)])
    rows = {m.name: m for m in comp.rows}
    assert rows["t exact_match"].interval(0) and not rows["t exact_match"].change(1)["significant"]
    assert not rows["perplexity"].change(1)["significant"] and not rows["task mean"].change(1)["significant"]
    table = comp.to_text().split("\n\n")[0]
    assert " *" not in table and "[" in table
    assert rows["bits per byte"].interval(0) == [0.9, 1.1]  # shown beside bits per byte, as perplexity's
    assert "| bits per byte | 1 [0.9, 1.1] |" in comp.to_markdown()


def test_a_real_loss_is_marked_significant(tmp_path):
    base, worse = [1] * 80 + [0] * 20, [0] * 40 + [1] * 40 + [0] * 20
    nll = [90.0 + i % 7 for i in range(16)]
    comp = Comparison(["a", "b"], [_itemized(base, nll), _itemized(worse, [x + 20 for x in nll])])
    rows = {m.name: m for m in comp.rows}
    assert rows["t exact_match"].change(1)["significant"] and rows["perplexity"].change(1)["significant"]
    assert rows["t exact_match"].relation(1) == pytest.approx(-0.4)
    assert ") *" in comp.to_markdown()
    data = json.loads(comp.write(tmp_path)["json"].read_text())
    row = next(r for r in data["rows"] if r["metric"] == "t exact_match")
    assert row["paired"]["b"]["test"] == "mcnemar" and row["intervals"]["a"][0] < 0.8 < row["intervals"]["a"][1]


def test_version_1_results_compare_without_a_verdict():
    comp = Comparison(["a", "b"], [_result(), _result(acc=0.3)])
    assert any("no per-item results" in n for n in comp.notes())


def test_sizes_in_memory_and_on_disk_are_two_labelled_rows():
    base, small = _result(size=480e6), _result(size=480e6)
    small.speed["disk_bytes"] = 234e6  # its bf16 checkpoint, recorded after export
    comp = Comparison(["a", "b"], [base, small])
    rows = {m.name: m for m in comp.rows}
    assert rows["size MB"].values == [pytest.approx(480), pytest.approx(480)]
    assert rows["size on disk MB"].values == [None, pytest.approx(234)]
    notes = " ".join(comp.notes())
    assert "size MB: the weights' bytes in memory" in notes and "size on disk MB: the weight files" in notes
    # measured from folders, the size row already is the size on disk: no second row, no memory note
    on_disk = [_result(), _result()]
    for r in on_disk:
        r.speed.update(size_kind="disk", disk_bytes=r.speed["size_bytes"])
    comp = Comparison(["a", "b"], on_disk)
    assert "size on disk MB" not in {m.name for m in comp.rows} and "bytes in memory" not in " ".join(comp.notes())
