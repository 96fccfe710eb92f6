"""HealConfig: how a compressed model is trained back toward the original (its teacher).

Three methods, cheapest first:
- `local`: fit only the layers next to each damaged site (a removed block, a layer that lost
  heads or MLP neurons) so that they reproduce the teacher's hidden state after the site, from cached
  activations. No lm_head, no full forward: seconds to a minute.
- `distill`: the whole student forward, forward KL to the teacher's next-token distributions
  (optionally plus hidden-state matching at the sites), through transformers' Trainer.
- `local+distill`: local repair first, then distillation from there.
"""
from __future__ import annotations

from dataclasses import dataclass

from mi_opt.errors import MiOptError

METHODS = ("local", "distill", "local+distill")
# "all": every weight; "lora": LoRA adapters on every decoder linear, merged at the end;
# "localized": only the layers next to each damaged site, which the plan (hence the profile) names.
TRAINS = ("all", "lora", "localized")
# What becomes of LoRA adapters at the end: folded into the weights (quantized modules quantized
# again), or kept unmerged beside the untouched quantized weights and shipped in PEFT's format.
ADAPTERS = ("merge", "keep")


@dataclass
class HealConfig:
    method: str = "distill"
    train: str = "localized"
    # --- data: calibration text only (never evaluation windows), optionally teacher-written
    source: str = "handbook"         # text source of the calibration split (mi_opt.data.load_text)
    self_generated: float = 0.0      # fraction of training windows the teacher writes itself
    seq_len: int = 256               # tokens per training window
    eval_seq_len: int = 256          # no training token comes from an evaluation window of this length
    seed: int = 0
    # --- distillation (method distill / local+distill)
    steps: int = 40                  # optimizer steps
    batch_size: int = 4              # windows per step (before accumulation)
    grad_accum: int = 1              # steps of accumulation per optimizer step
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"       # a transformers lr_scheduler_type: constant, cosine, linear
    weight_decay: float = 0.0
    temperature: float = 1.0         # softens both distributions; the loss is scaled by T^2
    hidden_weight: float = 0.0       # weight of hidden-state matching at the damaged sites
    save_steps: int = 10             # a resumable training checkpoint every N steps
    # --- what trains
    radius: int = 1                  # localized / local: kept layers on each side of a site that train
    lora_rank: int = 8
    lora_alpha: float = 16.0
    adapters: str = "merge"          # merge | keep (LoRA heals only)
    # --- local repair (method local / local+distill)
    local_steps: int = 150           # optimizer steps per site, over the cached activations
    local_lr: float = 1e-4
    local_windows: int = 32          # calibration windows whose activations are cached

    def __post_init__(self):
        if self.method not in METHODS:
            raise MiOptError(f"heal.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.train not in TRAINS:
            raise MiOptError(f"heal.train must be one of {', '.join(TRAINS)}, got {self.train!r}")
        if self.adapters not in ADAPTERS:
            raise MiOptError(f"heal.adapters must be one of {', '.join(ADAPTERS)}, got {self.adapters!r}")
        if self.adapters == "keep" and not self.uses_distill:
            raise MiOptError("heal.adapters 'keep' keeps LoRA adapters, which only distillation trains: use method "
                             "'distill' or 'local+distill', or adapters 'merge'")
        if self.adapters == "keep" and self.train == "all":
            raise MiOptError("heal.adapters 'keep' needs LoRA adapters; train 'all' trains the weights themselves: "
                             "use train 'lora' (or 'localized' on a quantized plan)")
        if not 0.0 <= self.self_generated <= 1.0:
            raise MiOptError(f"heal.self_generated must be a fraction in [0, 1], got {self.self_generated}")
        for name in ("seq_len", "eval_seq_len", "steps", "batch_size", "grad_accum", "save_steps", "lora_rank", "local_steps",
                     "local_windows"):
            if getattr(self, name) < 1:
                raise MiOptError(f"heal.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 8:
            raise MiOptError(f"heal.seq_len must be >= 8 tokens, got {self.seq_len}")
        for name in ("lr", "local_lr", "temperature", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise MiOptError(f"heal.{name} must be > 0, got {getattr(self, name)}")
        if self.radius < 1:
            raise MiOptError(f"heal.radius must be >= 1 (the kept layers on each side of a site that train), "
                             f"got {self.radius}")
        if self.warmup_steps and self.schedule == "constant":
            raise MiOptError("heal.warmup_steps needs a schedule with warmup: constant_with_warmup, cosine or linear")
        for name in ("warmup_steps", "weight_decay", "hidden_weight"):
            if getattr(self, name) < 0:
                raise MiOptError(f"heal.{name} must be >= 0, got {getattr(self, name)}")
        if self.schedule not in ("constant", "cosine", "linear", "constant_with_warmup"):
            raise MiOptError(f"heal.schedule must be constant, constant_with_warmup, cosine or linear, "
                             f"got {self.schedule!r}")
        if self.method == "local" and self.train == "lora":
            raise MiOptError("heal.train 'lora' needs method 'distill' or 'local+distill'; local repair fits "
                             "the layers around each site directly")

    @property
    def uses_distill(self) -> bool:
        return self.method in ("distill", "local+distill")

    @property
    def uses_local(self) -> bool:
        return self.method in ("local", "local+distill")

    def windows_needed(self) -> int:
        """Training windows one pass of distillation reads (each window is used once)."""
        return self.steps * self.batch_size * self.grad_accum if self.uses_distill else 0
