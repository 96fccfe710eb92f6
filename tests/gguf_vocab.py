"""A tensor-less GGUF holding a tiny tokenizer, as llama.cpp's conversion script writes a BPE one
(`convert_hf_to_gguf.py --vocab-only`): what GGUF exports of tiny folder models copy."""
from __future__ import annotations

import json


def save_vocab_gguf(path, tokenizer) -> str:
    import gguf

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == "<eos>" else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]])
    writer.add_eos_token_id(vocab["<eos>"])
    writer.add_license("apache-2.0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)
