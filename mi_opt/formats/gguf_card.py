"""The model card of a GGUF export: what changed and what was measured (as every export's card
says), then which GGML type each plan width became and how to run the file."""
from __future__ import annotations

from mi_opt.card import model_card
from mi_opt.plan import CompressionPlan


def gguf_card(plan: CompressionPlan, sidecar: dict, eval_results: dict | None, heal=None) -> str:
    g = sidecar["gguf"]
    # The shared card up to its loading section, which is about safetensors checkpoints.
    head = model_card(plan, {**sidecar, "loader": "transformers"}, eval_results, heal).split("## How to load")[0]
    widths = ", ".join(f"{w} bit -> {t}" for w, t in sorted(g["bits_to_ggml"].items(), key=lambda kv: -int(kv[0])))
    counts = ", ".join(f"{n} {t}" for t, n in sorted(g["type_counts"].items()))
    f = g["file"]
    lines = [head.rstrip(), "", "## GGUF tensor types", "",
             f"`{f}` ({g['bytes'] / 1e6:.1f} MB, architecture `{g['architecture']}`) quantized by the `gguf` "
             "package's quantizers from the unquantized weights"
             + (f", its Q4_0 / Q5_0 blocks chosen by GPTQ (rounding errors compensated on calibration text) in "
                f"{len(g.get('gptq_kept') or [])} linears, rounded to nearest in the others (where GPTQ did not beat "
                "it on held-out windows)" if g.get("quantizer") == "gptq" else "") + f". Plan widths map to GGML types as: {widths}; "
             "1-D tensors (norms) stay F32. The per-tensor types are in `mi-opt-compression.json` "
             f"(`gguf.tensor_types`). Tensors: {counts}.", "",
             f"Verified at export: transformers reads the file with logits within "
             f"{sidecar['verified_max_logit_diff']:.3g} of the in-memory model run on the same dequantized weights.",
             "", "## How to load", "", "llama.cpp:", "", "```sh", f"llama-cli -m {f} -p 'Hello'", "```", "",
             "llama-cpp-python:", "", "```python", "from llama_cpp import Llama",
             f"llm = Llama(model_path='PATH/{f}')", "```", "",
             "transformers (dequantizes to float on load):", "", "```python",
             "from transformers import AutoModelForCausalLM",
             f"model = AutoModelForCausalLM.from_pretrained(PATH, gguf_file='{f}')", "```", ""]
    if g["tokenizer"] == "none":
        lines += ["The file has no tokenizer (`tokenizer.ggml.model = none`): feed it token ids.", ""]
    lines += ["## Files", "", f"- `{f}`: the model, for llama.cpp.",
              "- `plan.json`: the compression plan.", "- `mi-opt-compression.json`: shapes and per-tensor GGML types.",
              "- `profile.json`, `heal.json` (when present): the scores the plan came from; the healing record.", ""]
    return "\n".join(lines)
