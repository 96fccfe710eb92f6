"""The model card (README.md) written next to every exported checkpoint."""
from __future__ import annotations

import json

from mi_opt.plan import CompressionPlan


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v)[:200] + "`"
    return str(v)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict) and v and len(rows) < 60:
            rows += _flatten(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def pruned_neurons(plan: CompressionPlan) -> dict[int, int]:
    """MLP neurons the plan removes per kept layer (original numbering): a dropped layer's are gone with it."""
    dropped = set(plan.drop_layers)
    return {i: len(v) for i, v in plan.prune_neurons.items() if i not in dropped and v}


def model_card(plan: CompressionPlan, sidecar: dict, eval_results: dict | None, heal=None) -> str:
    src = plan.model.get("spec") or "the source model"
    lines = [f"# {src}, compressed with mi-opt", "",
             f"Made from `{src}` (fingerprint `{plan.model.get('fingerprint')}`) by the mi-opt planner "
             f"`{plan.planner.get('name', '?')}`. Weights were removed or quantized for real, not masked.", "",
             "## What was changed", ""]
    n0 = plan.model.get("n_layers")
    if plan.drop_layers:
        lines.append(f"- Removed {len(plan.drop_layers)} of {n0} decoder layers (original numbering): "
                     f"{', '.join(map(str, plan.drop_layers))}.")
    if plan.prune_heads:
        n = sum(len(h) for h in plan.prune_heads.values())
        lines.append(f"- Removed {n} attention heads in {len(plan.prune_heads)} layers ({plan.head_mode} mode); "
                     f"per layer (original numbering): "
                     + "; ".join(f"L{i}: {h}" for i, h in sorted(plan.prune_heads.items())) + ".")
    neurons = pruned_neurons(plan)
    if neurons:
        lines.append(f"- Removed {sum(neurons.values())} MLP neurons in {len(neurons)} layers ({plan.neuron_mode} "
                     "mode); neurons removed per layer (original numbering; the indices are in `plan.json`): "
                     + "; ".join(f"L{i}: {n}" for i, n in sorted(neurons.items())) + ".")
    quant = sidecar.get("quantization") or {}
    if quant.get("modules"):
        widths: dict[int, int] = {}
        for b in quant["modules"].values():
            widths[b] = widths.get(b, 0) + 1
        backend = quant.get("backend", "bitsandbytes")
        if backend == "bitsandbytes":
            how = ((f" (4-bit format {quant.get('quant_type')})" if 4 in widths else "")
                   + (f" (int8 with LLM.int8 outlier threshold {quant.get('int8_threshold')})" if 8 in widths else ""))
        else:  # torchao: weights only, activations stay in the model's dtype
            groups = {g for g in (quant.get("scale_groups") or {}).values()}
            scales = ", ".join("one scale per row" if g is None else f"one scale per {g} inputs" for g in
                               sorted(groups, key=lambda g: g or 0)) or "one scale per row"
            how = f" ({quant.get('format', 'int8-weight-only')}, {scales}; torchao {quant.get('backend_version')})"
        lines.append(f"- Quantized with {backend}: " + ", ".join(
            f"{c} modules at {b} bit" for b, c in sorted(widths.items())) + how + "; the rest full precision.")
    if plan.is_empty():
        lines.append("- Nothing: the plan was empty.")
    if heal is not None:
        lines.append("- Healed after compression, toward the original model (details in `heal.json`):")
        lines += [f"  - {line}" for line in heal.summary()]
    lines += ["", f"Layers: {sidecar['n_layers']}; query heads per layer: {[h for h, _ in sidecar['heads']]}; "
              f"KV heads per layer: {[kv for _, kv in sidecar['heads']]}"
              + (f"; MLP sizes per layer: {sidecar['mlp_sizes']}." if sidecar.get("mlp_sizes") else "."),
              f"Parameters: {sidecar['parameters']:,}"
              + (f" (source: {plan.predicted['parameters_before']:,})." if "parameters_before" in plan.predicted
                 else "."), ""]
    lines += ["## Measured results", ""]
    if eval_results:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in _flatten(eval_results)]
    else:
        lines.append("Not measured at export time; run `mi-opt eval` on this folder.")
    lines += ["", "## How to load", ""]
    if sidecar["loader"] == "transformers":
        needs = {"torchao": " (with torchao installed: `pip install torchao`)",
                 "bitsandbytes": " (with bitsandbytes installed)"}.get(quant.get("backend"), "") if quant.get("modules") else ""
        lines += [f"Plain transformers loads it{needs}:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)",
                  "```", "", "(`mi_opt.load_compressed(PATH)` works too.)"]
    else:
        lines += [f"Plain transformers cannot express this checkpoint ({sidecar['loader_reason']}); "
                  "load it with mi-opt, which rebuilds the per-layer shapes from `mi-opt-compression.json` first:",
                  "", "```python", "from mi_opt.export import load_compressed",
                  "from transformers import AutoTokenizer",
                  "model = load_compressed(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```"]
    if sidecar.get("adapters"):
        lines += ["", f"The healed model's LoRA adapters ({len(sidecar['adapters']['modules'])} modules, rank "
                  f"{sidecar['adapters']['rank']}) are kept unmerged in `{sidecar['adapters']['path']}/`, in PEFT's "
                  "format: `load_compressed` applies them; with transformers alone the model loads without them, "
                  f"and `model.load_adapter(PATH + '/{sidecar['adapters']['path']}')` (or "
                  f"`peft.PeftModel.from_pretrained(model, PATH + '/{sidecar['adapters']['path']}')`) adds them."]
    lines += ["", "## Files", "",
              "- `model.safetensors`, `config.json`, tokenizer files: the checkpoint.",
              "- `plan.json`: the compression plan (budget, predicted size, planner settings).",
              "- `mi-opt-compression.json`: per-layer shapes and quantization metadata the loader reads.",
              "- `profile.json` (when present): the importance scores the plan came from.",
              "- `heal.json` (when present): how the model was healed after compression.",
              "- `adapter/` (when present): LoRA adapters kept unmerged by the heal (PEFT format).", ""]
    return "\n".join(lines)
