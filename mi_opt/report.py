"""report.md and report.html for one run: what was removed, what it cost, what it gained."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from mi_opt.artifacts import atomic_write_bytes  # noqa: E402
from mi_opt.card import pruned_neurons  # noqa: E402
from mi_opt.plan import CompressionPlan  # noqa: E402
from mi_opt.units import key_order, layer_of  # noqa: E402

BIT_COLORS = {16: "#4c956c", 8: "#f2c14e", 5: "#f4a261", 4: "#f78154"}


def layer_bits(plan: CompressionPlan, n_layers: int) -> list[int]:
    """The narrowest width applied to any module of each layer (16 = untouched)."""
    bits = [16] * n_layers
    for key, width in plan.bits.items():
        layer = layer_of(key)
        if layer is not None:
            bits[layer] = min(bits[layer], width)
    return bits


def mlp_kept(plan: CompressionPlan, n_layers: int) -> dict[int, float]:
    """Fraction of MLP neurons each kept, narrowed layer keeps (original numbering), from the sizes the
    plan predicts; empty when it prunes none or predicts no sizes."""
    kept = [i for i in range(n_layers) if i not in set(plan.drop_layers)]
    sizes = plan.predicted.get("mlp_sizes") or []
    if not plan.prune_neurons or len(sizes) != len(kept):
        return {}
    return {i: size / (size + len(plan.prune_neurons[i])) for i, size in zip(kept, sizes) if plan.prune_neurons.get(i)}


def decision_chart(plan: CompressionPlan, n_heads: list[int], path: Path) -> Path:
    """Per layer: kept or dropped, the fraction of heads kept, the bit width, and (a black tick)
    the fraction of MLP neurons kept."""
    n_layers = len(n_heads)
    bits = layer_bits(plan, n_layers)
    neurons = mlp_kept(plan, n_layers)
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * n_layers), 3.2))
    if neurons:
        ax.scatter(list(neurons), list(neurons.values()), marker="_", s=200, color="black", zorder=3)
    for i in range(n_layers):
        if i in plan.drop_layers:
            ax.bar(i, 1, color="white", edgecolor="#b23a48", hatch="xx", linewidth=0.8)
            continue
        kept = 1 - len(plan.prune_heads.get(i, [])) / n_heads[i]
        ax.bar(i, kept, color=BIT_COLORS[bits[i]], edgecolor="black", linewidth=0.4)
    legend = [Patch(facecolor="white", edgecolor="#b23a48", hatch="xx", label="layer dropped")]
    legend += [Patch(color=c, label=f"{b}-bit") for b, c in BIT_COLORS.items() if b in bits or b == 16]
    if neurons:
        legend.append(Patch(color="black", label="MLP neurons kept"))
    ax.legend(handles=legend, loc="lower right", fontsize=8, ncol=4)
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of heads kept" + (" (ticks: neurons)" if neurons else ""))
    ax.set_title("Decisions per layer")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plan_summary(plan: CompressionPlan, n_layers: int, formats: dict[int, str] | None = None) -> list[str]:
    """formats: width -> how it was quantized, when not bitsandbytes (a GGUF export's GGML types)."""
    lines = []
    if plan.drop_layers:
        lines.append(f"Dropped {len(plan.drop_layers)} of {n_layers} layers: {', '.join(map(str, plan.drop_layers))}.")
    if plan.prune_heads:
        total = sum(len(v) for v in plan.prune_heads.values())
        lines.append(f"Pruned {total} attention heads in {len(plan.prune_heads)} layers ({plan.head_mode} mode): "
                     + "; ".join(f"L{k}: {v}" for k, v in sorted(plan.prune_heads.items())) + ".")
    neurons = pruned_neurons(plan)
    if neurons:
        lines.append(f"Pruned {sum(neurons.values())} MLP neurons in {len(neurons)} layers ({plan.neuron_mode} mode), "
                     "per layer: " + "; ".join(f"L{k}: {n}" for k, n in sorted(neurons.items())) + ".")
        if plan.predicted.get("mlp_sizes"):
            lines.append(f"MLP sizes of the kept layers: {plan.predicted['mlp_sizes']}.")
    quantized = {k: b for k, b in plan.bits.items() if b < 16}
    if quantized:
        by_width = {}
        for key, b in quantized.items():
            by_width.setdefault(b, []).append(key)
        fmt = formats or {"torchao": {8: "torchao int8 weight-only"},
                          "gguf": {4: f"GGUF {plan.quant_type}", 8: "GGUF Q8_0"}}.get(
            plan.backend, {4: plan.quant_type, 8: f"int8, outlier threshold {plan.int8_threshold}"})
        lines += [f"{b}-bit ({fmt[b]}): {', '.join(sorted(keys, key=key_order))}."
                  for b, keys in sorted(by_width.items())]
    predicted = plan.predicted
    if predicted.get("parameters") and predicted.get("parameters_before"):
        lines.append(f"Predicted parameters: {predicted['parameters_before']:,} -> {predicted['parameters']:,}.")
    return lines or ["The plan removes nothing."]


def _formats(recipe) -> dict[int, str] | None:
    """GGML types per width when the run evaluated and shipped GGUF weights (export.format gguf)."""
    if recipe.export.format != "gguf":
        return None
    return {w: f"GGUF {t}" for w, t in recipe.export.gguf_options().mapping().items()}


def write_report(root: Path, recipe, profile, plan: CompressionPlan, base_eval, comp_eval, healed=None,
                 speed_ab: dict | None = None) -> Path:
    """healed: (EvalResult, HealRecord) when the recipe heals, shown as a third column.
    speed_ab: the interleaved A/B timing of original and compressed (evaluate/ab_speed.py)."""
    from mi_opt.evaluate.ab_speed import warning_line
    from mi_opt.evaluate.compare import Comparison

    n_heads = profile.model["heads"]
    labels, results = ["original", recipe.name], [base_eval, comp_eval]
    if healed:
        labels.append(f"{recipe.name} healed")
        results.append(healed[0])
    comparison = Comparison(labels, results, speed_ab=speed_ab)
    comparison.write(root)  # compare.md, compare.json, pareto.png
    decision_chart(plan, n_heads, root / "decisions.png")
    figures = [(name, f) for name, f in [("Importance of each head", "heads.png"),
                                         ("Importance of each layer and sublayer", "layers.png")]
               if (root / f).exists()]
    md = [f"# mi-opt report: {recipe.name}", "", recipe.description.strip() or "", "",
          "## What was removed", "", *[f"- {line}" for line in plan_summary(plan, len(n_heads), _formats(recipe))], "",
          "![decisions](decisions.png)", "",
          *(["## Recovery after compression", "", *[f"- {line}" for line in healed[1].summary()], ""]
            if healed else []),
          "## What it cost and what it gained", "",
          *([warning_line(speed_ab), ""] if speed_ab and speed_ab["warnings"] else []),  # before the table
          comparison.to_markdown(), "![pareto](pareto.png)", "",
          "## Why: importance profile", "",
          f"Scorer `{profile.method.get('scorer')}`"
          + (f", {profile.method.get('ablation')} ablation" if profile.method.get("ablation") else "")
          + f", calibration {profile.calibration.get('source')} ({profile.calibration.get('n_samples')} x "
          f"{profile.calibration.get('seq_len')} tokens)"
          + (f", base loss {profile.base_loss:.3f}" if profile.base_loss is not None else "") + "; "
          f"profiling took {profile.cost.get('wall_time_s', 0):.0f} s.", ""]
    for title, f in figures:
        md += [f"### {title}", "", f"![{title}]({f})", ""]
    md += ["## Recipe", "", "```yaml", recipe.to_yaml().strip(), "```", "",
           "Files: profile.json, plan.json, eval_original.json, eval_compressed.json, compare.json"
           + (", speed_ab.json" if speed_ab else "") + ", *.lm_eval.json (lm-eval's own results)"
           + (", heal.json, eval_healed.json" if healed else "")
           + (", checkpoint/ (load instructions in checkpoint/README.md)" if (root / "checkpoint").exists() else ""),
           ""]
    text = "\n".join(md)
    atomic_write_bytes(root / "report.md", text.encode())
    atomic_write_bytes(root / "report.html", _html(recipe.name, text).encode())
    return root / "report.md"


def _html(title: str, md_text: str) -> str:
    import markdown

    body = markdown.markdown(md_text, extensions=["tables", "fenced_code"])
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
             "img{max-width:100%}pre{background:#f5f5f5;padding:1em;overflow:auto}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>mi-opt: {title}</title>" \
           f"<style>{style}</style></head><body>{body}</body></html>\n"
