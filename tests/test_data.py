import json
import re

import pytest
import torch
from tiny import tiny_tokenizer

from mi_opt.data import EVAL_EVERY, load_text, token_windows
from mi_opt.errors import MiOptError


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_bundled_corpora_are_real_prose():
    for name in ("handbook", "kjv"):
        text = load_text(name)
        assert len(text) > 300_000 and text.count(" ") > 50_000


def test_windows_are_deterministic_and_shaped(tok):
    a = token_windows(tok, "kjv", 6, 32, seed=1)
    b = token_windows(tok, "kjv", 6, 32, seed=1)
    c = token_windows(tok, "kjv", 6, 32, seed=2)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_and_evaluation_windows_never_overlap(tok):
    cal = token_windows(tok, "handbook", 200, 64, split="calibration")
    ev = token_windows(tok, "handbook", 50, 64, split="evaluation")
    cal_rows = {tuple(r.tolist()) for r in cal}
    assert not any(tuple(r.tolist()) in cal_rows for r in ev)
    # The split is fixed per window, so asking for more samples never moves a window across it.
    assert EVAL_EVERY >= 2


def test_local_txt_and_jsonl(tmp_path, tok):
    (tmp_path / "a.txt").write_text("word " * 2000)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": "line %d " % i * 20}) for i in range(200)))
    assert token_windows(tok, str(tmp_path / "a.txt"), 4, 16).shape == (4, 16)
    assert token_windows(tok, str(tmp_path / "b.jsonl"), 4, 16).shape == (4, 16)
    assert "word" in load_text(f"{tmp_path / 'a.txt'}+kjv")


def test_bad_inputs(tmp_path, tok):
    with pytest.raises(MiOptError, match="exceeds the model's context"):
        token_windows(tok, "kjv", 2, 4096, max_positions=2048)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(MiOptError, match="only 0 calibration windows"):
        token_windows(tok, str(tmp_path / "short.txt"), 4, 64)
    with pytest.raises(MiOptError, match="unknown text source"):
        load_text("no-such-corpus")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(MiOptError, match="needs a string field 'text'"):
        load_text(str(tmp_path / "bad.jsonl"))


def test_mixed_sources_contribute_windows_in_turn(tok):
    mixed = token_windows(tok, "handbook+synthetic:arithmetic", 6, 32)
    from_arithmetic = [bool(re.search(r"\d+ = \d+", tok.decode(r))) for r in mixed]
    assert from_arithmetic == [False, True] * 3
    ev = token_windows(tok, "handbook+kjv", 40, 32, split="evaluation")
    cal = {tuple(r.tolist()) for r in token_windows(tok, "handbook", 400, 32)}
    assert not any(tuple(r.tolist()) in cal for r in ev)


def test_repeat_prefix_writes_each_windows_first_half_twice(tok):
    plain = token_windows(tok, "handbook", 3, 17)
    repeated = token_windows(tok, "repeat:handbook", 3, 17)
    assert repeated.shape == plain.shape
    assert torch.equal(repeated[:, :9], plain[:, :9])        # the first half, as it was
    assert torch.equal(repeated[:, 9:], plain[:, :8])        # then written again
    mixed = token_windows(tok, "handbook+repeat:handbook", 4, 17)
    assert torch.equal(mixed[0], plain[0])                      # parts take turns: prose,
    assert torch.equal(mixed[1, 9:], mixed[1, :8])               # then a repeated window


def test_repeat_keeps_a_leading_bos_once():
    from mi_opt.data import repeat_halves

    windows = torch.tensor([[1, 10, 11, 12, 13, 14]])
    assert repeat_halves(windows, offset=1).tolist() == [[1, 10, 11, 12, 10, 11]]
