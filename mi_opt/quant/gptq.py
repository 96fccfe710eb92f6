"""GPTQ for llama.cpp's symmetric block formats (Q4_0, Q5_0): error-compensating quantization.

Round-to-nearest rounds every weight on its own. GPTQ (Frantar et al. 2022) quantizes a linear's
input columns one at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian of the layer's reconstruction loss, H = X^T X over
calibration inputs X, so that the layer's *outputs* on real activations move as little as possible.

The result must be exactly what a GGUF file can hold, and stay so when the writer quantizes it
again (mi_opt/formats/gguf.py re-derives every block from the weights it is given):
- scales are GGML's: per row, a block of 32 inputs shares d = (its largest-magnitude value) / -2^(b-1),
  stored as float16; d is taken when GPTQ reaches the block, from the error-updated weights;
- the value that set d is pinned to the lowest level (-2^(b-1) d), which it sits next to anyway, so
  every block's largest magnitude is exactly -2^(b-1) d and re-quantizing reproduces every value.

Hessians come from the unquantized model on calibration windows (one forward, every linear at
once), not layer by layer through the already-quantized layers: cheaper, and what GPTQ's own
ablations found nearly as good. A linear keeps its GPTQ weights only where they beat round-to-nearest
on held-out windows (see gptq_).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from mi_opt.errors import MiOptError
from mi_opt.hooks import Hook, attached

BLOCK = 32                      # GGML's block of inputs sharing one scale
LEVELS = {"Q4_0": 4, "Q5_0": 5}  # symmetric block types GPTQ writes: bits per weight value
DAMP = 0.1                      # Hessian damping, a fraction of its mean diagonal (GPTQ uses 0.01; SmolLM2's
                                # held-out output error was lower at 0.1 for every linear measured)
COLUMNS = 128                   # columns updated together (lazy batch updates; a multiple of BLOCK)


def _scales(block: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float16-exact scale per row, index of the value that set it) for a (rows, 32) block."""
    where = block.abs().argmax(dim=1)
    peak = block.gather(1, where[:, None])[:, 0]
    return (peak / -(2 ** (bits - 1))).half().float(), where


def _round(column: torch.Tensor, d: torch.Tensor, bits: int, pinned: torch.Tensor) -> torch.Tensor:
    """GGML's rounding of one column to its rows' scales (trunc(x / d + half + 0.5), clipped), with
    the pinned rows put on the lowest level; returns the dequantized values."""
    half = 2 ** (bits - 1)
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(column * inv + half + 0.5).clamp(0, 2 * half - 1)
    q = torch.where(pinned, torch.zeros_like(q), q)
    return d * (q - half)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, kind: str, damp: float = DAMP) -> torch.Tensor:
    """`weight` (out x in) quantized to GGML type `kind` by GPTQ against `hessian` (in x in, X^T X);
    returns the dequantized weight (float32), on the type's grid."""
    if kind not in LEVELS:
        raise MiOptError(f"GPTQ writes {', '.join(LEVELS)}; {kind} is quantized round-to-nearest")
    rows, cols = weight.shape
    if cols % BLOCK or hessian.shape != (cols, cols):
        raise MiOptError(f"GPTQ needs rows of a multiple of {BLOCK} values and a {cols} x {cols} Hessian; got a "
                         f"{rows} x {cols} weight and a {tuple(hessian.shape)} Hessian")
    bits = LEVELS[kind]
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = h.diagonal() == 0              # inputs never active: nothing to preserve, nothing to spread
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(cols, dtype=h.dtype)
    try:
        inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise MiOptError("GPTQ: the calibration Hessian is not positive definite even after damping; give more "
                         "calibration windows") from None
    out = torch.zeros_like(w)
    d = pinned_col = None
    for start in range(0, cols, COLUMNS):
        stop = min(start + COLUMNS, cols)
        chunk, errors, chunk_inv = w[:, start:stop].clone(), torch.zeros_like(w[:, start:stop]), inv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % BLOCK == 0:
                d, pinned_col = _scales(chunk[:, i:i + BLOCK].float(), bits)
                d, pinned_col = d.double(), pinned_col + col
            value = _round(chunk[:, i], d, bits, pinned_col == col)
            out[:, col] = value
            err = (chunk[:, i] - value) / chunk_inv[i, i]
            chunk[:, i:] -= err[:, None] * chunk_inv[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ inv[start:stop, stop:]
    return out.float()


def collect_hessians(model: nn.Module, names: list[str], windows: torch.Tensor, batch_size: int = 4,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """name -> X^T X of the inputs the named linears see on `windows` (the unquantized model)."""
    modules = {name: model.get_submodule(name) for name in names}
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in modules.items()}
    # q/k/v (and gate/up) read the same tensor: its X^T X is computed once per batch. The products
    # run in float32 (each batch's sum is short), the running sums in float64.
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def accumulate(name: str):
        def hook(module, args, output):
            x = args[0]
            if id(x) not in seen or seen[id(x)][0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                seen[id(x)] = (x, (flat.T @ flat).to("cpu", torch.float64))
            sums[name] += seen[id(x)][1]
        return hook

    device = next(model.parameters()).device
    with attached([Hook(m, accumulate(n)) for n, m in modules.items()]), torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="GPTQ Hessians", unit="batch", disable=not progress):
            seen.clear()
            model(input_ids=windows[start:start + batch_size].to(device))
    return sums


def _rtn(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """Round-to-nearest, as the GGUF writer quantizes (the gguf backend's round trip)."""
    from mi_opt.quant import get_backend

    return get_backend("gguf").round_trip(weight, kind)


def _output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over inputs x of |(W - Q) x|^2, with X^T X = hessian."""
    diff = (weight.double() - quantized.double()).cpu()
    return float(((diff @ hessian) * diff).sum())


def gptq_(model: nn.Module, types: dict[str, str], windows: torch.Tensor, progress: bool = True) -> dict[str, str]:
    """Replace, in place, every weight whose GGML type (parameter name -> type, as tensor_types gives)
    GPTQ writes; returns parameter name -> "gptq" or "rtn" for those weights.

    GPTQ fits each linear to the calibration inputs it sees, and a linear with many inputs and
    heavy-tailed activations (SmolLM2's down_proj: 1536 inputs) can fit them at the expense of other
    text. So a quarter of the windows is held out: a linear keeps its GPTQ weights only where they
    move its outputs on the held-out windows less than round-to-nearest does, and is rounded to
    nearest otherwise. Other types are left for the writer's round-to-nearest."""
    targets = {name[:-len(".weight")]: kind for name, kind in types.items()
               if kind in LEVELS and name.endswith(".weight")
               and isinstance(model.get_submodule(name[:-len(".weight")]), nn.Linear)}
    if not targets:
        return {}
    if len(windows) < 2:
        raise MiOptError("GPTQ needs at least 2 calibration windows: it holds a quarter out to check each linear")
    held = max(1, len(windows) // 4)
    fit = collect_hessians(model, list(targets), windows[:-held], progress=progress)
    check = collect_hessians(model, list(targets), windows[-held:], progress=progress)
    chosen = {}
    with torch.no_grad():
        for name, kind in tqdm(targets.items(), desc="GPTQ", unit="linear", disable=not progress):
            weight = model.get_submodule(name).weight
            gptq, rtn = gptq_quantize(weight, fit.pop(name), kind), _rtn(weight, kind)
            h = check.pop(name)
            better = _output_error(weight, gptq, h) < _output_error(weight, rtn, h)
            weight.copy_((gptq if better else rtn).to(weight.device, weight.dtype))
            chosen[f"{name}.weight"] = "gptq" if better else "rtn"
    return chosen
