"""Training text for healing: calibration windows, and text the teacher writes itself.

Only the calibration split of a source is ever read (mi_opt.data: window i is an evaluation
window iff i % 5 == 4), and the evaluation tasks' files are refused as a source, so neither
evaluation windows nor task items can reach training. Self-generated windows need no labels:
the teacher continues the first tokens of calibration windows, sampling from its own
distribution, so the student learns the teacher's behaviour beyond the calibration domain.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mi_opt.data import token_windows
from mi_opt.errors import MiOptError
from mi_opt.heal.config import HealConfig

TASK_DIR = (Path(__file__).parent.parent / "tasks").resolve()
PROMPT_TOKENS = 16        # tokens of a calibration window that start a self-generated window
GENERATION_BATCH = 8


def _check_source(source: str) -> None:
    for part in source.split("+"):
        path = Path(part.removeprefix("repeat:")).expanduser()
        if path.exists() and TASK_DIR in path.resolve().parents:
            raise MiOptError(f"heal.source {part!r} is an evaluation task file: training on task items would "
                             "make every task score meaningless; use prose (handbook, kjv, a .txt file)")


def self_generated_windows(teacher: nn.Module, prompts: torch.Tensor, seq_len: int, seed: int,
                           pad_token_id: int | None, progress: bool = True) -> torch.Tensor:
    """(n, seq_len) windows: each prompt row continued by the teacher's own samples."""
    device = next(teacher.parameters()).device
    out = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(prompts), GENERATION_BATCH), desc="teacher writes", leave=False,
                          disable=not progress):
            batch = prompts[start:start + GENERATION_BATCH].to(device)
            ids = teacher.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, top_p=0.95,
                                   temperature=1.0, min_new_tokens=seq_len - batch.shape[1],
                                   max_new_tokens=seq_len - batch.shape[1], pad_token_id=pad_token_id)
            out.append(ids[:, :seq_len].cpu())
    return torch.cat(out)


def training_windows(tokenizer, teacher: nn.Module, config: HealConfig, n_windows: int,
                     max_positions: int | None = None, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """`n_windows` training windows (calibration split, cycled in new orders when the corpus is
    smaller) and a record of where they came from."""
    _check_source(config.source)
    n_self = round(n_windows * config.self_generated)
    n_prose = n_windows - n_self
    parts, record = [], {"source": config.source, "split": "calibration", "prose_windows": n_prose,
                         "self_generated_windows": n_self, "seq_len": config.seq_len}
    def calibration(n: int, seed: int) -> torch.Tensor:
        return token_windows(tokenizer, config.source, n, config.seq_len, split="calibration", seed=seed,
                             max_positions=max_positions, cycle=True, avoid_eval_len=config.eval_seq_len)

    if n_prose:
        parts.append(calibration(n_prose, config.seed))
    if n_self:
        # Prompts are the first tokens of another draw of calibration windows (seed + 1), so the
        # generated text does not simply repeat the prose windows above.
        prompt_len = min(PROMPT_TOKENS, config.seq_len // 2)
        prompts = calibration(n_self, config.seed + 1)[:, :prompt_len]
        parts.append(self_generated_windows(teacher, prompts, config.seq_len, config.seed, tokenizer.pad_token_id,
                                            progress))
        record["generation"] = {"prompt_tokens": prompt_len, "do_sample": True, "top_p": 0.95,
                                "temperature": 1.0}
    windows = torch.cat(parts) if len(parts) > 1 else parts[0]
    if n_prose and n_self:  # interleave, so every step sees both kinds
        windows = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed))]
    record["tokens"] = int(windows.numel())
    record["avoids_evaluation_windows_of"] = config.eval_seq_len
    return windows, record
