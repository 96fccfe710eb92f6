"""Recovery after compression: `heal_(student, teacher, plan, config)` trains the compressed model
back toward the original in place, and returns a HealRecord (heal.json).

Healing changes weights, never structure: the healed model exports and loads exactly where the
unhealed one did. What trains is chosen from the plan (mi_opt.heal.sites): the layers around
each removed block or head- or neuron-pruned layer, LoRA adapters (merged at the end, so the checkpoint
stays plain), or every weight.
"""
from __future__ import annotations

import contextlib
import resource
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from mi_opt.adapters import lora_layers
from mi_opt.arch import get_adapter
from mi_opt.errors import MiOptError
from mi_opt.handle import LoadedModel, bare
from mi_opt.heal.config import METHODS, TRAINS, HealConfig
from mi_opt.heal.data import training_windows
from mi_opt.heal.lora import dequantized_stand_ins_, keep_lora_, merge_lora_, put_back_, quantized_names, wrap_lora
from mi_opt.heal.losses import forward_kl
from mi_opt.heal.record import WEIGHTS, HealRecord, load_changed_, save_changed, settled_fingerprint
from mi_opt.heal.sites import Block, damage_blocks
from mi_opt.plan import CompressionPlan

__all__ = ["heal_", "HealConfig", "HealRecord", "METHODS", "TRAINS", "WEIGHTS", "check_compatible",
           "kl_to_teacher", "load_changed_", "save_changed"]

PROBE_WINDOWS = 4   # training windows on which KL to the teacher is measured before and after


def check_compatible(student: nn.Module, teacher: nn.Module, student_tokenizer=None, teacher_tokenizer=None) -> None:
    """A teacher must predict over the same vocabulary, token for token, or the KL compares nothing."""
    sv = student.config.get_text_config().vocab_size
    tv = teacher.config.get_text_config().vocab_size
    if sv != tv:
        raise MiOptError(f"the teacher's vocabulary has {tv} entries and the student's {sv}: heal with the original "
                         "model the checkpoint was compressed from")
    if student_tokenizer is not None and teacher_tokenizer is not None \
            and student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise MiOptError("the teacher's tokenizer differs from the student's: heal with the original model the "
                         "checkpoint was compressed from")


def kl_to_teacher(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch_size: int = 2) -> float:
    """Mean KL(teacher || student) per token on `windows`."""
    device = next(student.parameters()).device
    total = 0.0
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            ids = windows[i:i + batch_size].to(device)
            kl = forward_kl(student(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits)
            total += kl.item() * len(ids)
    return total / len(windows)


def _decoder_linears(model: nn.Module) -> list[str]:
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for layer in adapter.layers() for m in adapter.linear_modules(layer).values()]


def _layer_params(model: nn.Module, layers: list[int]) -> list[str]:
    adapter = get_adapter(model)
    wanted = {id(p) for i in layers for p in adapter.layers()[i].parameters() if p.is_floating_point()}
    return [n for n, p in model.named_parameters() if id(p) in wanted]


def _block_layers(blocks: list[Block]) -> list[int]:
    return sorted({i for b in blocks for i in b.layers})


def _selection(student: nn.Module, config: HealConfig, blocks: list[Block]) -> tuple[str, list[str]]:
    """("params", names) to train directly, or ("lora", module names) to wrap with adapters."""
    quantized = quantized_names(student)
    if config.train == "lora":
        return "lora", _decoder_linears(student)
    if config.train == "all":
        if quantized:
            raise MiOptError("heal.train 'all' cannot train quantized weights; use train 'lora' (QLoRA: adapters "
                             "on the frozen quantized modules) or 'localized'")
        return "params", [n for n, p in student.named_parameters() if p.is_floating_point()]
    if blocks:
        adapter = get_adapter(student)
        names = {id(m): n for n, m in student.named_modules()}
        linears = [names[id(m)] for i in _block_layers(blocks)
                   for m in adapter.linear_modules(adapter.layers()[i]).values()]
        if set(linears) & set(quantized):  # a combined plan: adapters on the damaged layers' linears
            return "lora", linears
        return "params", _layer_params(student, _block_layers(blocks))
    if quantized:  # a bits-only plan: the damage is in the quantized modules, adapters go there
        return "lora", quantized
    raise MiOptError("heal: the plan removes and quantizes nothing, so there is nothing to heal")


def _check_shapes(student: nn.Module, teacher: nn.Module, plan: CompressionPlan, config: HealConfig,
                  blocks: list[Block]) -> None:
    n_original = get_adapter(teacher).n_layers()
    if plan.model.get("n_layers") not in (None, n_original):
        raise MiOptError(f"the plan is for a {plan.model['n_layers']}-layer model but the teacher has {n_original}: "
                         "heal toward the model the plan was made for")
    expected = n_original - len(plan.drop_layers)
    if get_adapter(student).n_layers() != expected:
        raise MiOptError(f"the student has {get_adapter(student).n_layers()} layers but the plan leaves {expected}: "
                         "heal the model that apply_(model, plan) returned")
    if config.hidden_weight and not blocks:
        raise MiOptError("heal.hidden_weight matches hidden states at removed layers or pruned heads or neurons; "
                         "this plan has none of them: set it to 0")
    if config.uses_local and any(quantized_names(get_adapter(student).layers()[i]) for i in _block_layers(blocks)):
        raise MiOptError("heal.method 'local' cannot fit layers that hold quantized modules; use method 'distill' "
                         "(LoRA adapters on them)")


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_kind": "cuda, since the heal started"}
    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
            "peak_memory_kind": "process peak RSS (includes whatever the process held before the heal)"}


def _distill_phase(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, config: HealConfig,
                   blocks: list[Block], selection: tuple[str, list[str]], work_dir: str | Path | None,
                   progress: bool, callbacks: list | None) -> dict:
    """Distil with only the selected parameters (or adapters on the selected modules) trainable."""
    from mi_opt.heal.distill import distill_

    kind, names = selection
    for p in student.parameters():
        p.requires_grad_(False)
    own_dir = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="mi-opt-heal-")) if own_dir else Path(work_dir)
    originals = dequantized_stand_ins_(student, quantized_names(student))
    trainable = wrap_lora(student, names, config) if kind == "lora" else student
    try:
        if kind == "params":
            params = dict(student.named_parameters())
            for n in names:
                params[n].requires_grad_(True)
        report = distill_(student, trainable, teacher, windows, config, blocks, work, progress, callbacks)
        if kind == "lora" and config.adapters == "keep":  # shipped beside the weights, in PEFT's format
            report["kept_adapters"] = keep_lora_(trainable, student, originals)
        elif kind == "lora":  # no adapters in the checkpoint: it loads where it did
            report["requantized"] = merge_lora_(trainable, student, originals)
        else:
            put_back_(student, originals)
        trainable = originals = None
        return report
    finally:
        if trainable is not None and kind == "lora":  # a failure mid-training: the model as it came
            trainable.unload()
        if originals:
            put_back_(student, originals)
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _restored_on_failure(student: nn.Module, names: list[str]):
    """A heal that fails or is interrupted part-way leaves the student as it came, not half
    trained (adapters are removed by _distill_phase itself; their base weights never change)."""
    params = dict(student.named_parameters())
    saved = {n: params[n].detach().to("cpu", copy=True) for n in dict.fromkeys(names)}  # off the accelerator
    grad_flags = {n: p.requires_grad for n, p in params.items()}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)
        raise
    finally:
        for n, p in student.named_parameters():
            p.requires_grad_(grad_flags.get(n, False))


def _train(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, config: HealConfig, blocks: list[Block],
           selection: tuple[str, list[str]], work_dir, progress: bool, callbacks, cost: dict):
    """Local repair and/or distillation; returns their reports and the parameter names changed."""
    from mi_opt.heal.local import local_repair_

    kind, names = selection
    local_report: list[dict] = []
    distill_report: dict = {}
    changed: set[str] = set()
    if config.uses_local:
        started = time.perf_counter()
        local_report = local_repair_(student, teacher, blocks, windows[:config.local_windows], config, progress)
        changed.update(_layer_params(student, _block_layers(blocks)))
        cost["local_s"] = round(time.perf_counter() - started, 2)
    if config.uses_distill:
        started = time.perf_counter()
        distill_report = _distill_phase(student, teacher, windows[:config.windows_needed()], config, blocks,
                                        selection, work_dir, progress, callbacks)
        if kind == "lora" and config.adapters == "keep":
            changed.update(n for n, _ in student.named_parameters() if ".lora_" in n)
        else:
            changed.update([f"{m}.weight" for m in names] if kind == "lora" else names)
        cost["distill_s"] = round(time.perf_counter() - started, 2)
    return local_report, distill_report, changed


def heal_(student: nn.Module | LoadedModel, teacher: nn.Module | LoadedModel, plan: CompressionPlan,
          config: HealConfig | None = None, tokenizer=None, work_dir: str | Path | None = None, progress: bool = True,
          callbacks: list | None = None) -> HealRecord:
    """Heal `student` (the compressed model, changed in place) toward `teacher` (the original); either
    may be a bare model or a handle, whose tokenizer serves when `tokenizer` is None.

    plan: the plan that made the student (it says where the damage is). work_dir: where
    distillation keeps resumable checkpoints; a rerun with the same work_dir resumes.
    """
    config = config or HealConfig()
    tokenizer = tokenizer or next((h.tokenizer for h in (student, teacher) if isinstance(h, LoadedModel)), None)
    student, teacher = bare(student), bare(teacher)
    if tokenizer is None:
        raise MiOptError("heal_ needs the tokenizer to read its training text")
    check_compatible(student, teacher)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    blocks = damage_blocks(plan, get_adapter(teacher).n_layers(), config.radius)
    _check_shapes(student, teacher, plan, config, blocks)
    if config.uses_local and not blocks:
        raise MiOptError("heal.method 'local' repairs removed layers and pruned heads or neurons; this plan only "
                         "quantizes: use method 'distill' (LoRA on the quantized modules)")
    if lora_layers(student):
        raise MiOptError("the student already carries unmerged LoRA adapters (a checkpoint healed with "
                         "heal.adapters 'keep'): heal the checkpoint from before that heal")
    kind, names = _selection(student, config, blocks) if config.uses_distill else ("params", [])
    if config.adapters == "keep" and kind != "lora":
        raise MiOptError("heal.adapters 'keep' keeps LoRA adapters, but this heal trains the weights of the layers "
                         "next to each cut: use train 'lora', or adapters 'merge'")
    device = next(student.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cost: dict = {}
    unhealed = settled_fingerprint(student)

    started = time.perf_counter()
    n_windows = max(config.windows_needed(), config.local_windows if config.uses_local else 0)
    windows, data_record = training_windows(tokenizer, teacher, config, n_windows,
                                            get_adapter(student).max_positions(), progress)
    cost["data_s"] = round(time.perf_counter() - started, 2)
    probe = windows[:PROBE_WINDOWS]
    kl_before = kl_to_teacher(student, teacher, probe)

    touched = (_layer_params(student, _block_layers(blocks)) if config.uses_local else []) \
        + (names if kind == "params" else [])
    with _restored_on_failure(student, touched):
        local_report, distill_report, changed = _train(student, teacher, windows, config, blocks, (kind, names),
                                                       work_dir, progress, callbacks, cost)
    student.eval()

    kl_after = kl_to_teacher(student, teacher, probe)
    n_trained = sum(p.numel() for n, p in student.named_parameters() if n in changed)
    cost.update(tokens=data_record["tokens"], optimizer_steps=config.steps if config.uses_distill else 0,
                **_peak_memory(device), wall_time_s=round(sum(v for k, v in cost.items() if k.endswith("_s")), 2))
    trained = {"mode": config.train if config.uses_distill else "local", "kind": kind,
               "layers": _block_layers(blocks), "changed_parameters": n_trained}
    if kind == "lora":
        trained.update(modules=names, requantized=distill_report.get("requantized", []),
                       adapters="kept" if config.adapters == "keep" else "merged")
    return HealRecord(config=asdict(config), trained=trained,
                      blocks=[{"layers": b.layers, "teacher_point": b.teacher_point, "why": b.why} for b in blocks],
                      data=data_record, local=local_report, distill=distill_report,
                      kl_to_teacher={"before": kl_before, "after": kl_after, "windows": len(probe)},
                      changed=sorted(changed), unhealed_fingerprint=unhealed, cost=cost)
