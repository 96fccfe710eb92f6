"""The losses healing minimizes, and the taps that read the residual stream for them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mi_opt.arch import ArchAdapter
from mi_opt.hooks import Hook


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at temperature T, times T^2 (Hinton et al.), so
    the gradient scale does not shrink as T grows. Forward KL makes the student cover all of the
    teacher's distribution, which is what keeps a skill rather than only the likeliest token."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean() * t * t


def relative_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Squared error relative to the teacher's mean square: comparable across layers, whose
    residual norms grow with depth by orders of magnitude."""
    target = teacher_hidden.float()
    return (student_hidden.float() - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def residual_taps(adapter: ArchAdapter, points: list[int], store: dict[int, torch.Tensor]) -> list[Hook]:
    """Hooks that put the residual stream entering layer p into store[p]; p == n_layers means
    the last layer's output (before the final norm)."""
    layers = adapter.layers()
    hooks = []
    for p in sorted(set(points)):
        if p < len(layers):
            def before(module, args, kwargs, p=p):
                store[p] = args[0] if args else kwargs["hidden_states"]
            hooks.append(Hook(layers[p], before, kind="forward_pre", with_kwargs=True))
        else:
            def after(module, args, output, p=p):
                store[p] = output[0] if isinstance(output, tuple) else output
            hooks.append(Hook(layers[-1], after))
    return hooks
