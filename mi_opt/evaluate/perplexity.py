"""Perplexity and bits per byte on evaluation windows (never calibration text).

Token perplexity depends on the tokenizer; bits per byte divides the same total loss by the
UTF-8 bytes of the predicted text, so models with different tokenizers can be compared.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mi_opt.arch import get_adapter
from mi_opt.data import token_windows
from mi_opt.errors import MiOptError
from mi_opt.handle import as_loaded
from mi_opt.evaluate.stats import bits_per_byte_interval, perplexity_summary

# Positions whose logits exist at once: the full (batch, seq, vocab) tensor of a 49k-vocabulary
# model is hundreds of MB in fp32, while its final hidden states are a few MB.
LOGIT_CHUNK = 64


def _head_logits(adapter, hidden: torch.Tensor) -> torch.Tensor:
    # The decoder's output is already normalized; only the head (and any soft-cap) remains.
    logits = adapter.lm_head()(hidden)
    cap = getattr(adapter.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def window_nll(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
               chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """Next-token NLL (nats) of every predicted position: shape (n_windows, seq_len - 1)."""
    adapter = get_adapter(model)
    device = adapter.embedding().weight.device
    if device.type == "meta":  # offloaded under accelerate: run from the execution device
        device = torch.device(getattr(adapter.embedding()._hf_hook, "execution_device", "cpu"))
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch",
                          disable=not progress):
            ids = windows[start:start + batch_size].to(device)
            hidden = adapter.decoder()(input_ids=ids, use_cache=False).last_hidden_state
            nll = torch.empty(ids.shape[0], ids.shape[1] - 1)
            for pos in range(0, ids.shape[1] - 1, chunk):
                end = min(pos + chunk, ids.shape[1] - 1)
                logits = _head_logits(adapter, hidden[:, pos:end])
                targets = ids[:, pos + 1:end + 1]
                nll[:, pos:end] = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                  reduction="none").view_as(targets).cpu()
            out.append(nll)
    return torch.cat(out)


def predicted_bytes(tokenizer, windows: torch.Tensor) -> int:
    """UTF-8 bytes of the text the predicted tokens (all but each window's first) decode to."""
    return sum(len(tokenizer.decode(w[1:].tolist()).encode("utf-8")) for w in windows)


def perplexity(model, tokenizer=None, source: str = "handbook", n_samples: int = 16, seq_len: int = 256,
               batch_size: int = 4, seed: int = 0, progress: bool = True) -> dict:
    """exp(mean token NLL) and bits per byte over `n_samples` evaluation windows of `source`.
    model: a bare model (give its tokenizer) or a handle (its own tokenizer serves when None)."""
    handle = as_loaded(model)
    model, adapter, tokenizer = handle.model, handle.adapter, tokenizer or handle.tokenizer
    if tokenizer is None:
        raise MiOptError("perplexity needs the tokenizer that reads its text: pass tokenizer=, or a LoadedModel")
    windows = token_windows(tokenizer, source, n_samples, seq_len, split="evaluation", seed=seed,
                            max_positions=adapter.max_positions() or None)
    nll = window_nll(model, windows, batch_size, progress)
    total = float(nll.double().sum())
    n_bytes = predicted_bytes(tokenizer, windows)
    # Per-window sums keep the result pairable: two models on the same windows (same windows_hash)
    # are compared window by window (evaluate/paired.py), which is far tighter than two intervals.
    window_sums = [float(x) for x in nll.double().sum(dim=1)]
    window_tokens = [nll.shape[1]] * nll.shape[0]
    return {"perplexity": math.exp(total / nll.numel()), "nll_mean": total / nll.numel(),
            **perplexity_summary(window_sums, window_tokens),
            "bits_per_byte": total / math.log(2) / n_bytes,
            "bits_per_byte_interval": bits_per_byte_interval(window_sums, window_tokens, n_bytes), "n_tokens": nll.numel(), "n_bytes": n_bytes,
            "source": source, "split": "evaluation", "n_samples": n_samples, "seq_len": seq_len,
            "seed": seed, "windows_hash": windows_hash(windows), "window_nll_sum": window_sums,
            "window_tokens": window_tokens}


def windows_hash(windows: torch.Tensor) -> str:
    """Digest of the token ids evaluated: equal digests mean the same windows, so pairing is valid."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
