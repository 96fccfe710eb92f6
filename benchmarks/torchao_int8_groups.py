"""Follow-up to benchmarks/torchao_int8.py: does a finer int8 scale close the gap to the +0.1 target?

torchao's Int8WeightOnlyConfig takes a granularity; the backend uses one scale per output row
(PerRow). This measures every decoder linear of SmolLM2 at PerGroup(64) and PerGroup(32) (576 = 9 x 64: 128 does not divide the hidden size) on the
same windows (handbook+kjv, 16 x 256), and per-row on kjv alone, the text of reports/bits.md's
earlier ad-hoc weight-only check (+0.05). Perplexity only; writes reports/torchao_int8_groups.json,
which benchmarks/torchao_int8.py's report quotes.

    python benchmarks/torchao_int8_groups.py
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from mi_opt.artifacts import versions, write_json
from mi_opt.evaluate import evaluate
from mi_opt.evaluate.config import EvalConfig
from mi_opt.models import load_model
from mi_opt.quant import get_backend

REPORTS = Path(__file__).resolve().parent.parent / "reports"


def main() -> None:
    get_backend("torchao").version()  # imports torchao quietly
    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup, PerRow

    torch.set_num_threads(2)
    base, tok = load_model("smollm2-135m")
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    rows: dict[str, dict] = {}
    for label, granularity, source in [("per-group 64", PerGroup(64), "handbook+kjv"),
                                       ("per-group 32", PerGroup(32), "handbook+kjv"),
                                       ("fp32 (reference)", None, "kjv"), ("per-row", PerRow(), "kjv")]:
        model = copy.deepcopy(base)
        if granularity is not None:
            quantize_(model, FqnToConfig({n: Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)
                                          for n in names}), filter_fn=None)
        config = EvalConfig(parts=("perplexity",), text_source=source, ppl_samples=16, ppl_seq_len=256)
        rows[label + " on " + source] = {"granularity": label, "text": source,
                                         "perplexity": evaluate(model, tok, config, progress=False).perplexity["perplexity"]}
        print(label, source, rows[label + " on " + source]["perplexity"], flush=True)
        del model
        write_json(REPORTS / "torchao_int8_groups.json", {"rows": rows, "versions": versions()})


if __name__ == "__main__":
    main()
