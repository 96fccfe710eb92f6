"""Fixtures for evaluator tests: a tiny model whose vocabulary matches a real tokenizer, so text
corpora and lm-eval tasks run end to end in seconds."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer from the converted cache folder (no download)."""
    from transformers import AutoTokenizer

    from mi_opt.models import resolve_model_path

    folder, _ = resolve_model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def word_model(vocab_size: int, seed: int = 0):
    """A 2-layer Llama with a real vocabulary size (embedding and head are most of its weights)."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            max_position_embeddings=512, tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return model.eval()


@pytest.fixture(scope="session")
def smol_tiny(smol_tokenizer):
    """(tiny model, SmolLM2 tokenizer)."""
    return word_model(len(smol_tokenizer)), smol_tokenizer
