"""Where a plan damaged the model, in the student's numbering: what heals, and against what.

A site is a removed block of layers or a layer that lost heads or MLP neurons. The layers that train for it
are the kept layers within `radius` of it, as one contiguous block of the student. Its target
is a point of the residual stream that exists in both models: the hidden state entering the
student's layer after the block equals, in an undamaged model, the teacher's hidden state
entering the same original layer (or both models' last-layer output at the end).
"""
from __future__ import annotations

from dataclasses import dataclass

from mi_opt.errors import MiOptError
from mi_opt.plan import CompressionPlan


@dataclass(frozen=True)
class Block:
    """Student layers first..last train so that the residual after `last` matches the teacher's."""

    first: int            # student layer index
    last: int             # student layer index (inclusive)
    teacher_point: int    # original layer whose input is the target; n_original = the final output
    why: str              # which sites this block repairs, for heal.json

    @property
    def layers(self) -> list[int]:
        return list(range(self.first, self.last + 1))


def kept_layers(plan: CompressionPlan, n_original: int) -> list[int]:
    """Original index of each student layer."""
    dropped = set(plan.drop_layers)
    return [i for i in range(n_original) if i not in dropped]


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def damage_blocks(plan: CompressionPlan, n_original: int, radius: int) -> list[Block]:
    """The student blocks to heal: one per removed block of layers or head- or neuron-pruned layer, merged
    where they overlap. Empty for a plan that only quantizes."""
    kept = kept_layers(plan, n_original)
    student_of = {orig: s for s, orig in enumerate(kept)}
    spans: list[tuple[int, int, str]] = []
    for a, b in _runs(plan.drop_layers):
        before = [student_of[o] for o in range(max(0, a - radius), a) if o in student_of]
        after = [student_of[o] for o in range(b + 1, min(n_original, b + 1 + radius)) if o in student_of]
        trained = before + after
        if not trained:
            raise MiOptError(f"heal: no kept layer lies within radius {radius} of removed layers {a}..{b}; "
                             "raise heal.radius")
        spans.append((min(trained), max(trained), f"removed L{a}" + (f"-L{b}" if b > a else "")))
    # A narrowed layer (heads or neurons) trains itself and the radius - 1 layers after it.
    for layer in sorted(set(plan.prune_heads) | set(plan.prune_neurons)):
        if layer in student_of:
            s = student_of[layer]
            last = min(len(kept) - 1, s + max(radius, 1) - 1)
            what = " and ".join(w for w, pruned in (("heads", plan.prune_heads), ("MLP neurons", plan.prune_neurons))
                                if pruned.get(layer))
            spans.append((s, last, f"{what} of L{layer}"))
    blocks: list[list] = []
    for first, last, why in sorted(spans):
        if blocks and first <= blocks[-1][1]:
            blocks[-1][1] = max(blocks[-1][1], last)
            blocks[-1][2] += f", {why}"
        else:
            blocks.append([first, last, why])
    return [Block(first, last, kept[last + 1] if last + 1 < len(kept) else n_original, why)
            for first, last, why in blocks]
