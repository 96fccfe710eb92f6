"""mi-opt: compress language models by locating what matters with causal experiments.

    from mi_opt import load_model, profile_ablation, make_plan, apply_, heal_, evaluate, export, run_recipe

Names are imported on first use, so `import mi_opt` (and the CLI) starts fast.
"""
from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"


class _OncePerMessage(logging.Filter):
    """bitsandbytes logs the same CPU notice on every int8 matmul; one line is informative enough.

    Its offline notice about the optional hub-downloaded 4-bit kernel is dropped: mi-opt never
    downloads kernels and the built-in CPU path is what it uses and tests.
    """

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Failed to load CPU gemm_4bit_forward from kernels-community"):
            return False
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


for _name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).addFilter(_OncePerMessage())

_EXPORTS = {
    "load_model": "mi_opt.models",
    "token_windows": "mi_opt.data",
    "profile_ablation": "mi_opt.profile.ablation",
    "AblationConfig": "mi_opt.profile.ablation",
    "run_scorer": "mi_opt.profile.scorers",
    "SCORERS": "mi_opt.profile.scorers",
    "ImportanceProfile": "mi_opt.profile.importance",
    "CompressionPlan": "mi_opt.plan",
    "make_plan": "mi_opt.policy",
    "PLANNERS": "mi_opt.policy",
    "apply_": "mi_opt.surgery",
    "heal_": "mi_opt.heal",
    "HealConfig": "mi_opt.heal",
    "evaluate": "mi_opt.evaluate",
    "EvalConfig": "mi_opt.evaluate",
    "export": "mi_opt.export",
    "load_compressed": "mi_opt.export",
    "Recipe": "mi_opt.recipe",
    "load_recipe": "mi_opt.recipe",
    "run_recipe": "mi_opt.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        return module.run if name == "run_recipe" else getattr(module, name)
    raise AttributeError(f"module 'mi_opt' has no attribute {name!r}")
