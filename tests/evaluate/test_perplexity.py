import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model, tiny_windows

from mi_opt.errors import MiOptError
from mi_opt.evaluate.perplexity import perplexity, predicted_bytes, window_nll


def _hand_nll(model, windows):
    with torch.no_grad():
        logp = F.log_softmax(model(windows).logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, windows[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_window_nll_matches_full_logits(family):
    model = tiny_model(family)
    windows = tiny_windows(6, 20)
    torch.testing.assert_close(window_nll(model, windows, batch_size=4, progress=False), _hand_nll(model, windows),
                               atol=1e-4, rtol=1e-4)


def test_chunked_logits_equal_unchunked():
    model, windows = tiny_model("llama"), tiny_windows(3, 20)
    whole = window_nll(model, windows, progress=False, chunk=1000)
    # several chunks, the last one partial
    torch.testing.assert_close(window_nll(model, windows, progress=False, chunk=3), whole)


def test_perplexity_is_exp_mean_nll_and_bits_per_byte(smol_tiny):
    from mi_opt.data import token_windows

    model, tok = smol_tiny
    result = perplexity(model, tok, "handbook", n_samples=3, seq_len=32, batch_size=2, progress=False)
    windows = token_windows(tok, "handbook", 3, 32, split="evaluation")
    nll = _hand_nll(model, windows)
    assert result["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-4)
    n_bytes = sum(len(tok.decode(w[1:].tolist()).encode("utf-8")) for w in windows)
    assert result["n_bytes"] == n_bytes == predicted_bytes(tok, windows)
    assert result["bits_per_byte"] == pytest.approx(nll.sum().item() / math.log(2) / n_bytes, rel=1e-4)
    assert result["n_tokens"] == 3 * 31 and result["split"] == "evaluation"
    low, high = result["bits_per_byte_interval"]
    assert low < result["bits_per_byte"] < high


def test_damaged_model_has_higher_perplexity(smol_tiny):
    from mi_opt.data import token_windows

    model, tok = smol_tiny
    windows = token_windows(tok, "handbook", 4, 32, split="evaluation")
    # Train the tiny model a few steps on the evaluation text so that it has something to lose.
    trained = _fit(model, windows)
    base = window_nll(trained, windows, progress=False).mean()
    with torch.no_grad():
        trained.model.layers[0].mlp.down_proj.weight.zero_()
        trained.model.layers[1].self_attn.o_proj.weight.mul_(-3)
    assert window_nll(trained, windows, progress=False).mean() > base


def _fit(model, windows, steps: int = 30):
    import copy

    model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(windows, labels=windows).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_bad_perplexity_inputs(smol_tiny):
    model, tok = smol_tiny
    with pytest.raises(MiOptError, match="only"):
        perplexity(model, tok, "handbook", n_samples=10**6, seq_len=32, progress=False)
    with pytest.raises(MiOptError, match="unknown text source"):
        perplexity(model, tok, "no-such-corpus", n_samples=1, seq_len=32, progress=False)
