"""Latency, throughput, memory and size of a model, timed honestly.

Untimed warm-up runs first, then several timed repetitions reported as median and min/max;
CUDA is synchronized around every clock read. Prompts are seeded random token ids, and
decoding is a plain greedy loop over the KV cache for exactly `new_tokens` steps, so an
early end-of-sequence token can never shorten a measurement.
"""
from __future__ import annotations

import inspect
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mi_opt.arch import get_adapter
from mi_opt.evaluate.config import SpeedConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_spread(values: list[float]) -> dict:
    """Median, quartiles (the interquartile range is the spread reports show) and extremes."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values),
            "n": len(values)}


def count_parameters(model: nn.Module) -> int:
    """Logical parameter count; bitsandbytes 4-bit weights are packed two per byte, so their
    element count is read from the quantization state's original shape."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += int(torch.Size(state.shape).numel()) if state is not None else p.numel()
    return total


def memory_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state dict (int8/packed 4-bit storage plus scales, absmax,
    quantization maps) and every buffer, each shared storage (tied embeddings) counted once."""
    seen, total = set(), 0
    # Non-persistent buffers (rotary frequencies) are missing from the state dict but use memory.
    for tensor in [*model.state_dict().values(), *model.buffers()]:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def disk_bytes(folder: str | Path) -> int:
    """Bytes of the weight files in a model folder (config and tokenizer files excluded), with
    those of kept LoRA adapters (its adapter/ folder): the model loads with them."""
    from mi_opt.adapters import ADAPTER_DIR

    folder = Path(folder)
    adapter = folder / ADAPTER_DIR
    return _weight_bytes(folder) + (_weight_bytes(adapter) if adapter.is_dir() else 0)


def _weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


class _PeakMemory:
    """Peak memory during a block: CUDA's max allocated bytes, or the process's peak RSS on CPU.

    On Linux, writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM), so the figure
    belongs to this block; elsewhere it falls back to the process-lifetime ru_maxrss.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"
        self.value = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.kind = "process_lifetime_max_rss"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.value = int(torch.cuda.max_memory_allocated(self.device))
            return
        if self.kind == "process_peak_rss":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.value = int(line.split()[1]) * 1024
                    return
        self.value = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def forward_kwargs(model: nn.Module) -> dict:
    # Serving computes logits for the last position only; transformers exposes that as
    # logits_to_keep on most families (a 49k-vocabulary head is a third of a forward).
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def timed_generation(model, ids: torch.Tensor, new_tokens: int, extra: dict) -> tuple[float, float, float]:
    """(prefill s, time to first token s, decode s for new_tokens - 1 tokens) of one run."""
    device = ids.device
    sync_device(device)
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False, **extra)
    sync_device(device)
    prefill = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, **extra)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync_device(device)
    ttft = time.perf_counter() - t0

    # transformers 5 names the KV cache `cache` (past_key_values is a deprecated alias).
    cache = out.cache
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, cache=cache, use_cache=True, **extra)
        cache = out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync_device(device)
    return prefill, ttft, time.perf_counter() - t0


def speed_prompt(model: nn.Module, config: SpeedConfig, device: str | torch.device | None = None
                 ) -> tuple[torch.device, torch.Tensor]:
    """(device, seeded random prompt ids) for timing `model`; the same config gives the same ids."""
    adapter = get_adapter(model)
    device = torch.device(device) if device is not None else adapter.embedding().weight.device
    max_pos = adapter.max_positions()
    if max_pos and config.prompt_len + config.new_tokens > max_pos:
        from mi_opt.errors import MiOptError

        raise MiOptError(f"speed prompt_len + new_tokens = {config.prompt_len + config.new_tokens} exceeds "
                         f"the model's context of {max_pos} tokens; lower them")
    vocab = adapter.embedding().weight.shape[0]
    gen = torch.Generator().manual_seed(config.seed)
    return device, torch.randint(0, vocab, (config.batch_size, config.prompt_len), generator=gen).to(device)


TIMING_KEYS = ("prefill_ms", "ttft_ms", "decode_tokens_per_s", "decode_ms_per_token")


def timing_summaries(runs: list[tuple[float, float, float]], config: SpeedConfig) -> dict:
    """The TIMING_KEYS summaries of timed runs (prefill s, ttft s, decode s) of one model."""
    prefill, ttft, decode = zip(*runs)
    decoded = config.batch_size * (config.new_tokens - 1)
    return {"prefill_ms": median_spread([t * 1e3 for t in prefill]),
            "ttft_ms": median_spread([t * 1e3 for t in ttft]),
            "decode_tokens_per_s": median_spread([decoded / t for t in decode]),
            "decode_ms_per_token": median_spread([t * 1e3 / (config.new_tokens - 1) for t in decode])}


def measure_speed(model: nn.Module, config: SpeedConfig | None = None, folder: str | Path | None = None,
                  device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Prefill latency, time to first token, decode tokens/s, peak memory, parameters and size.
    model: a bare model or a handle."""
    from mi_opt.handle import bare

    model = bare(model)
    config = config or SpeedConfig()
    device, ids = speed_prompt(model, config, device)
    extra = forward_kwargs(model)
    runs = []
    with torch.inference_mode(), _PeakMemory(device) as peak:
        for i in tqdm(range(config.warmup + config.repetitions), desc="speed", unit="run", disable=not progress):
            timing = timed_generation(model, ids, config.new_tokens, extra)
            if i >= config.warmup:
                runs.append(timing)
    result = {
        **timing_summaries(runs, config),
        "peak_memory_bytes": peak.value, "peak_memory_kind": peak.kind,
        "parameters": count_parameters(model), "memory_bytes": memory_bytes(model),
        "device": str(device), "threads": torch.get_num_threads(),
    }
    if folder is not None and Path(folder).is_dir():
        result.update(size_bytes=disk_bytes(folder), size_kind="disk", disk_bytes=disk_bytes(folder))
    else:
        result.update(size_bytes=result["memory_bytes"], size_kind="memory")
    return result
