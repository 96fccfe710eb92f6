"""Evaluate a model: perplexity, benchmark tasks (lm-eval) and speed, into one EvalResult."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from mi_opt.evaluate.config import DEFAULT_TASKS, PARTS, EvalConfig, SpeedConfig
from mi_opt.evaluate.perplexity import perplexity
from mi_opt.evaluate.result import EvalResult
from mi_opt.evaluate.speed import measure_speed
from mi_opt.evaluate.tasks import local_tasks, resolve_tasks, run_tasks
from mi_opt.handle import LoadedModel, as_loaded

__all__ = ["evaluate", "EvalConfig", "SpeedConfig", "EvalResult", "DEFAULT_TASKS", "PARTS", "local_tasks"]


@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    # torch's thread count is process-wide: set it for the evaluation only, then restore it.
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def evaluate(model: nn.Module | LoadedModel, tokenizer, config: EvalConfig | None = None, spec: str | None = None,
             folder: str | Path | None = None, progress: bool = True, trust_task_code: bool = False,
             resume_dir: str | Path | None = None) -> EvalResult:
    """Measure `model` as configured; the model is used in memory and left unchanged.

    spec: how the model was named (recorded only). folder: where its weights live on disk,
    so the size reported is bytes on disk rather than bytes in memory. trust_task_code: the
    user's --trust-task-code, never a recipe's (evaluate/tasks.py). resume_dir: keep each
    finished task there and reuse those found (run_tasks); the caller keys it to this model.
    """
    config = config or EvalConfig()
    loaded = as_loaded(model)
    model = loaded.model
    model.eval()
    device = config.device
    # A misspelled task should fail now, not after minutes of perplexity.
    resolved = resolve_tasks(config.tasks, trust_task_code) if "tasks" in config.parts else None
    with torch_threads(config.threads) as threads:
        settings = json.loads(json.dumps(asdict(config)))  # tuples -> lists, as eval.json holds them
        settings["threads"] = threads
        result = EvalResult(model=loaded.info.evaluated(spec), settings=settings)
        if "perplexity" in config.parts:
            started = time.perf_counter()
            result.perplexity = perplexity(model, tokenizer, config.text_source, config.ppl_samples,
                                           config.ppl_seq_len, config.ppl_batch_size, config.seed, progress)
            result.wall_time_s["perplexity"] = round(time.perf_counter() - started, 2)
        if "tasks" in config.parts:
            started = time.perf_counter()
            result.lm_eval_results = {}
            result.tasks = run_tasks(model, tokenizer, config.tasks, config.task_limit, config.task_batch_size,
                                     device, config.seed, resolved, trust_task_code, raw=result.lm_eval_results,
                                     resume_dir=resume_dir)
            result.wall_time_s["tasks"] = round(time.perf_counter() - started, 2)
        if "speed" in config.parts:
            started = time.perf_counter()
            result.speed = measure_speed(model, config.speed, folder, device, progress)
            result.wall_time_s["speed"] = round(time.perf_counter() - started, 2)
        result.machine["torch_threads"] = threads
    return result
