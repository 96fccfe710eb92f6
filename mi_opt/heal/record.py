"""heal.json (what healing did, on what data, at what cost) and the healed weights it changed."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mi_opt.artifacts import JsonArtifact, now, versions
from mi_opt.errors import MiOptError

WEIGHTS = "healed.safetensors"


@dataclass
class HealRecord(JsonArtifact):
    SCHEMA = "mi-opt/heal"
    VERSION = 1

    config: dict                                        # HealConfig fields
    trained: dict = field(default_factory=dict)         # what trained: mode, layers/modules, parameter count
    blocks: list = field(default_factory=list)          # damaged sites as student blocks (mi_opt.heal.sites)
    data: dict = field(default_factory=dict)            # sources, windows, tokens (calibration split only)
    local: list = field(default_factory=list)           # per block: relative MSE before/after local repair
    distill: dict = field(default_factory=dict)         # loss history, steps, resumed-from step
    kl_to_teacher: dict = field(default_factory=dict)   # mean KL(teacher || student) on training windows
    changed: list = field(default_factory=list)         # parameter names whose values healing changed
    unhealed_fingerprint: str = ""                      # the compressed model it started from
    cost: dict = field(default_factory=dict)            # wall time per phase, tokens, peak memory
    versions: dict = field(default_factory=versions)
    created: str = field(default_factory=now)


def save_changed(model: nn.Module, names: list[str], path: Path, unhealed_fingerprint: str) -> Path:
    """The healed values of `names` (tied parameters once), as safetensors, written atomically.

    unhealed_fingerprint: the compressed model's fingerprint before healing; loading checks it,
    because two plans can leave models of identical shapes (drop layer 1 or layer 2)."""
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().to("cpu").contiguous() for n in names}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"unhealed_fingerprint": unhealed_fingerprint})
    tmp.replace(path)
    return path


def load_changed_(model: nn.Module, path: Path) -> nn.Module:
    """Put healed values saved by `save_changed` back into the compressed model they were healed from."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from mi_opt.artifacts import model_fingerprint

    try:
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get("unhealed_fingerprint")
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise MiOptError(f"{path} is not a readable safetensors file ({err}); rerun the heal stage") from None
    if expected != model_fingerprint(model):
        raise MiOptError(f"{path} holds weights healed from another compressed model (another plan or source); "
                         "rerun the heal stage")
    params = dict(model.named_parameters())
    unknown = [n for n in tensors if n not in params]
    wrong = [n for n, t in tensors.items() if n in params and params[n].shape != t.shape]
    if unknown or wrong:
        raise MiOptError(f"{path} does not fit this model (unknown {unknown[:3]}, wrong shapes {wrong[:3]}): it "
                         "was healed from another plan; rerun the heal stage")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    return model
