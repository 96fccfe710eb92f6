"""Tiny seeded models of every supported family, built from configs (no downloads)."""
from __future__ import annotations

import torch

VOCAB = 512


def _config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  head_dim=8, tie_word_embeddings=False)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**{**common, "num_key_value_heads": 1}, sliding_window=16,
                                   layer_types=["sliding_attention", "sliding_attention",
                                                "full_attention", "sliding_attention"])
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=128,
                             bos_token_id=0, eos_token_id=0)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gpt2")


def tiny_model(family: str = "llama", seed: int = 0, attn_implementation: str = "eager"):
    """A 4-layer randomly initialized model, deterministic for a seed, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family), attn_implementation=attn_implementation)
    # Random init gives near-uniform predictions; larger weights give ablations visible effects.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return model.eval()


def tiny_windows(n: int = 8, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def tiny_tokenizer():
    """A byte-level BPE tokenizer with VOCAB entries, trained in memory on bundled text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mi_opt.data import load_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([load_text("handbook")[:20000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def save_tiny(folder, family: str = "llama"):
    """Write a tiny model and tokenizer as a local model folder; returns the folder."""
    tiny_model(family).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
