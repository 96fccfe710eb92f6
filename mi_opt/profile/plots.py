"""Pictures of an ImportanceProfile: a layers x heads heatmap and a per-layer bar chart."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mi_opt.artifacts import atomic_write_bytes  # noqa: E402
from mi_opt.profile.importance import ImportanceProfile  # noqa: E402
from mi_opt.units import parse_unit  # noqa: E402


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def head_heatmap(profile: ImportanceProfile, path: str | Path, metric: str = "delta_loss") -> Path | None:
    """Layers (rows) x heads (columns); None when the profile has no head units."""
    heads = [parse_unit(k) for k in profile.units("head")]
    if not heads:
        return None
    grid = np.full((max(u.layer for u in heads) + 1, max(u.index for u in heads) + 1), np.nan)
    for u in heads:
        grid[u.layer, u.index] = profile.score(u.key, metric)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * grid.shape[1], 1.5 + 0.22 * grid.shape[0]))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_title(f"Head importance ({metric}, {profile.method.get('ablation', '')} ablation)")
    fig.colorbar(im, ax=ax, label=metric)
    return _save(fig, Path(path))


def layer_bars(profile: ImportanceProfile, path: str | Path, metric: str = "delta_loss") -> Path | None:
    """One group of bars per layer: whole block, attention sublayer, MLP sublayer."""
    kinds = [k for k in ("layer", "attn", "mlp") if profile.units(k)]
    if not kinds:
        return None
    n_layers = profile.model["n_layers"]
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * n_layers), 3.5))
    for j, kind in enumerate(kinds):
        keys = profile.units(kind)
        xs = [parse_unit(k).layer + (j - (len(kinds) - 1) / 2) * width for k in keys]
        ys = [profile.score(k, metric) for k in keys]
        errs = [getattr(profile.scores[k], f"{metric}_se") or 0 for k in keys]
        ax.bar(xs, ys, width=width, yerr=errs, label={"layer": "whole layer", "attn": "attention",
                                                      "mlp": "MLP"}[kind], capsize=1.5)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{metric} when ablated")
    ax.set_title(f"Per-layer importance ({profile.method.get('ablation', '')} ablation, ±1 SE)")
    ax.legend()
    return _save(fig, Path(path))
