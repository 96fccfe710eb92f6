"""Distillation from the original model, on transformers' Trainer.

The Trainer (with accelerate underneath) brings gradient accumulation, mixed precision,
checkpoint/resume and multi-GPU launch (`accelerate launch`, `torchrun`); mi-opt adds only
the teacher, the loss (forward KL on next-token distributions, plus optional hidden-state
matching at the damaged sites) and which parameters train.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from mi_opt.arch import get_adapter
from mi_opt.heal.config import HealConfig
from mi_opt.heal.losses import forward_kl, relative_mse, residual_taps
from mi_opt.heal.sites import Block
from mi_opt.hooks import attached


class _Windows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i]}


def _collate(rows: list[dict]) -> dict:
    return {"input_ids": torch.stack([r["input_ids"] for r in rows])}


def _trainer_class():
    from transformers import Trainer  # imported here: `import mi_opt.heal` stays light

    class DistillTrainer(Trainer):
        """Trainer whose loss is the distance to a frozen teacher, not the labels' NLL."""

        def __init__(self, *args, teacher: nn.Module, heal: HealConfig, student_base: nn.Module,
                     blocks: list[Block], **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.heal = teacher, heal
            # Adapters come from the unwrapped models: a peft wrapper hides the family's layout.
            self.student_adapter, self.teacher_adapter = get_adapter(student_base), get_adapter(teacher)
            self.pairs = [(b.last + 1, b.teacher_point) for b in blocks] if heal.hidden_weight > 0 else []
            self.last_parts: dict[str, float] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            teacher_store: dict[int, torch.Tensor] = {}
            student_store: dict[int, torch.Tensor] = {}
            with torch.no_grad(), attached(residual_taps(self.teacher_adapter, [t for _, t in self.pairs],
                                                         teacher_store)):
                teacher_logits = self.teacher(ids, use_cache=False).logits
            with attached(residual_taps(self.student_adapter, [s for s, _ in self.pairs], student_store)):
                outputs = model(input_ids=ids, use_cache=False)
            loss = forward_kl(outputs.logits, teacher_logits, self.heal.temperature)
            self.last_parts = {"kl": loss.item()}
            if self.pairs:
                hidden = sum(relative_mse(student_store[s], teacher_store[t]) for s, t in self.pairs) / len(self.pairs)
                self.last_parts["hidden"] = hidden.item()
                loss = loss + self.heal.hidden_weight * hidden
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer


def last_complete_checkpoint(work_dir: Path) -> Path | None:
    """The newest checkpoint-N that finished saving (trainer_state.json is written last); half-written
    ones, from a kill during a save, are removed."""
    if not work_dir.is_dir():
        return None
    found = sorted((p for p in work_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    complete = None
    for p in found:
        if (p / "trainer_state.json").is_file():
            complete = p
        else:
            shutil.rmtree(p, ignore_errors=True)
    return complete


def _training_arguments(config: HealConfig, work_dir: Path, device: torch.device, dtype: torch.dtype,
                        progress: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(work_dir), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.lr, weight_decay=config.weight_decay,
        lr_scheduler_type=config.schedule, warmup_steps=config.warmup_steps, max_grad_norm=1.0,
        logging_steps=1, save_strategy="steps", save_steps=config.save_steps, save_total_limit=1,
        seed=config.seed, data_seed=config.seed, report_to=[], disable_tqdm=not progress,
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16 and device.type == "cuda", optim="adamw_torch")


def distill_(student: nn.Module, trainable: nn.Module, teacher: nn.Module, windows: torch.Tensor,
             config: HealConfig, blocks: list[Block], work_dir: Path, progress: bool = True,
             callbacks: list | None = None) -> dict:
    """Train `trainable` (the student itself, or its peft wrapper) toward the teacher on `windows`.

    Resumes from the newest complete checkpoint in work_dir. Returns the loss history and the
    step it resumed from.
    """
    device = next(student.parameters()).device
    dtype = next(student.parameters()).dtype
    args = _training_arguments(config, work_dir, device, dtype, progress)
    trainer = _trainer_class()(model=trainable, args=args, train_dataset=_Windows(windows), data_collator=_collate,
                               teacher=teacher, heal=config, student_base=student, blocks=blocks,
                               callbacks=callbacks)
    resume = last_complete_checkpoint(work_dir)
    teacher.eval()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    student.eval()
    history = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    return {"history": history, "resumed_from_step": int(resume.name.split("-")[-1]) if resume else 0,
            "last_parts": trainer.last_parts}
