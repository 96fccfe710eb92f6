"""SmolLM2 to GGUF: at the bundle's own types the export reproduces its source file bit for bit."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from mi_opt.artifacts import model_fingerprint
from mi_opt.export import export
from mi_opt.formats.gguf import apply_structure_, source_gguf
from mi_opt.formats.gguf_types import GgufOptions
from mi_opt.plan import CompressionPlan


@pytest.mark.integration
def test_the_bundles_own_types_reproduce_its_gguf_tensors_and_tokenizer(smollm2, tmp_path):
    """The bundled file is Q4_1 decoder linears, a Q8_0 embedding and F32 norms; the loaded "original"
    is it dequantized. Quantizing that again at the same types must give the same bytes: a check of
    tensor names, q/k row order, block layout and metadata against llama.cpp's own conversion."""
    import gguf
    from transformers import AutoTokenizer

    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    plan = CompressionPlan(model={"spec": "smollm2-135m", "fingerprint": model_fingerprint(model), "n_layers": 30},
                           predicted={}, bits={**{f"L{i}": 4 for i in range(30)}, "embed": 8})
    apply_structure_(model, plan)
    out = export(model, tokenizer, plan, tmp_path / "smol", format="gguf", gguf=GgufOptions(types={4: "Q4_1"}))
    source = {t.name: t for t in gguf.GGUFReader(source_gguf("smollm2-135m")).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert ours.keys() == source.keys()
    differ = [n for n in source if ours[n].tensor_type != source[n].tensor_type
              or not np.array_equal(np.asarray(ours[n].data), np.asarray(source[n].data))]
    assert differ == []
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>"
    reread = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    assert reread(text).input_ids == tokenizer(text).input_ids
