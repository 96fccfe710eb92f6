"""Local repair: fit only the layers around each damaged site to the teacher, from cached activations.

One pass of the student over the calibration windows records the hidden state entering the
first block (mi_opt.heal.sites) and the extra arguments every layer receives (rotary
embeddings, masks); one pass of the teacher records the residual stream at each block's target
point. Each block's layers then train alone, replayed on the cached inputs, to reproduce their
target (relative MSE). No lm_head and no full forward in the loop, so a block trains in
seconds. Blocks are repaired in order, and the cached hidden states are carried from one block
to the next through the layers as they now are, repaired ones included.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from mi_opt.arch import get_adapter
from mi_opt.heal.config import HealConfig
from mi_opt.heal.losses import relative_mse, residual_taps
from mi_opt.heal.sites import Block
from mi_opt.hooks import attached
from mi_opt.profile.engine import LayerInputs, run_layers


def _teacher_targets(teacher: nn.Module, batches: list[torch.Tensor], points: list[int]) -> list[dict]:
    adapter = get_adapter(teacher)
    targets = []
    with torch.no_grad():
        for ids in batches:
            store: dict[int, torch.Tensor] = {}
            with attached(residual_taps(adapter, points, store)):
                adapter.decoder()(ids, use_cache=False)
            targets.append(store)
    return targets


def _record_inputs(student: nn.Module, batches: list[torch.Tensor],
                   first: int) -> list[tuple[torch.Tensor, LayerInputs]]:
    """Per batch: the hidden state entering layer `first`, and every layer's extra arguments."""
    adapter = get_adapter(student)
    recorded = []
    with torch.no_grad():
        for ids in batches:
            inputs = LayerInputs.record(adapter, ids)
            hidden = inputs.hidden[first]
            inputs.hidden = [None] * len(inputs.hidden)  # the extras are all that replays need
            recorded.append((hidden, inputs))
    return recorded


def _advance(adapter, recorded, start: int, stop: int) -> list[tuple[torch.Tensor, LayerInputs]]:
    """The recorded hidden states carried from layer `start` to `stop` by the (repaired) layers."""
    with torch.no_grad():
        return [(run_layers(adapter, start, hidden, inputs, hidden.shape[0], stop=stop), inputs)
                for hidden, inputs in recorded]


def _block_loss(adapter, block: Block, recorded, targets, index: int) -> torch.Tensor:
    hidden, inputs = recorded[index]
    out = run_layers(adapter, block.first, hidden, inputs, hidden.shape[0], stop=block.last + 1)
    return relative_mse(out, targets[index][block.teacher_point])


def _mean_loss(adapter, block: Block, recorded, targets) -> float:
    with torch.no_grad():
        return sum(_block_loss(adapter, block, recorded, targets, i).item() for i in range(len(recorded))) / len(recorded)


def local_repair_(student: nn.Module, teacher: nn.Module, blocks: list[Block], windows: torch.Tensor,
                  config: HealConfig, progress: bool = True) -> list[dict]:
    """Repair every block in place; returns per block its relative MSE before and after, and time."""
    adapter = get_adapter(student)
    device = adapter.embedding().weight.device
    batches = [windows[i:i + config.batch_size].to(device) for i in range(0, len(windows), config.batch_size)]
    targets = _teacher_targets(teacher, batches, [b.teacher_point for b in blocks])
    recorded = _record_inputs(student, batches, blocks[0].first)
    at = blocks[0].first  # the layer whose input `recorded` holds
    report = []
    for block in blocks:
        started = time.perf_counter()
        recorded, at = _advance(adapter, recorded, at, block.first), block.first
        params = [p for i in block.layers for p in adapter.layers()[i].parameters() if p.is_floating_point()]
        before = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=config.local_lr, weight_decay=0.0)
        start_loss = _mean_loss(adapter, block, recorded, targets)
        student.train()
        try:
            for step in tqdm(range(config.local_steps), desc=f"local repair L{block.first}-L{block.last}",
                             leave=False, disable=not progress):
                loss = _block_loss(adapter, block, recorded, targets, step % len(batches))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
        finally:
            student.eval()
            for p, flag in zip(params, before):
                p.requires_grad_(flag)
                p.grad = None
        end_loss = _mean_loss(adapter, block, recorded, targets)
        report.append({"layers": block.layers, "teacher_point": block.teacher_point, "why": block.why,
                       "relative_mse_before": start_loss, "relative_mse_after": end_loss,
                       "wall_time_s": round(time.perf_counter() - started, 2)})
    return report
