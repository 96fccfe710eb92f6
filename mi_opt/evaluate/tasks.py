"""Benchmark tasks through lm-eval-harness, on the in-memory model.

The model is wrapped as `HFLM(pretrained=model, tokenizer=tokenizer)`, so a compressed model
is evaluated without being saved first. Tasks are either mi-opt's own (YAML + JSONL under
mi_opt/tasks/, offline), a path to a task YAML written the same way, or any standard
lm-eval task name (those download their dataset, so they need a network).

Task files are data, so those from outside mi_opt/tasks run no code unless the user says
`--trust-task-code`: their templates render in Jinja's sandbox (evaluate/sandbox.py) and their
`!function` entries, which import a Python file next to the YAML, are refused.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
from pathlib import Path

import torch
import yaml

from mi_opt.errors import MiOptError
from mi_opt.evaluate.stats import score_summary

TASK_DIR = Path(__file__).resolve().parents[1] / "tasks"
OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling")
REQUIRED = ("task", "dataset_path", "output_type", "doc_to_text", "doc_to_target")
N_EXAMPLES = 3  # model outputs kept per task in eval.json, so a score can be sanity-checked
LM_EVAL_BOOTSTRAP = 1000  # lm-eval's resamples for the stderr of metrics that are not plain means


TRUST_HINT = "pass --trust-task-code only if you trust the file's author"


class _PythonInTask(Exception):
    """A `!function` tag met while reading an untrusted task file."""


def is_packaged(path: str | Path) -> bool:
    """Whether a task file is one of mi-opt's own (mi_opt/tasks/), whose code is trusted."""
    return TASK_DIR in Path(path).resolve().parents


def _task_loader(path: Path, trust_code: bool) -> type:
    """yaml.SafeLoader plus lm-eval's `!function` tag: imported when trusted, refused otherwise."""
    class Loader(yaml.SafeLoader):
        pass

    def function(loader, node):
        if not trust_code:
            raise _PythonInTask(loader.construct_scalar(node))
        from lm_eval.utils import import_function

        return import_function(loader, node, yaml_path=path)

    Loader.add_constructor("!function", function)
    return Loader


def read_task_file(path: str | Path, trust_code: bool = False) -> dict:
    """A task YAML as an lm-eval config dict, checked, with its data files made absolute.

    Relative `dataset_kwargs.data_files` are read relative to the YAML's folder, so a task
    folder works from any working directory. trust_code: allow `!function` (imports Python).
    """
    path = Path(path)
    if not path.is_file():
        raise MiOptError(f"task file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        config = yaml.load(text, Loader=_task_loader(path, trust_code or is_packaged(path)))  # noqa: S506
    except UnicodeDecodeError as err:
        raise MiOptError(f"task file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except _PythonInTask as err:
        raise MiOptError(f"task file {path}: `!function {err}` would import and run Python code; "
                         f"{TRUST_HINT}") from None
    except yaml.YAMLError as err:
        raise MiOptError(f"task file {path} is not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise MiOptError(f"task file {path} must be a YAML mapping of lm-eval task fields")
    missing = [k for k in REQUIRED if not config.get(k) and config.get(k) != 0]
    if config.get("output_type") == "multiple_choice" and "doc_to_choice" not in config:
        missing.append("doc_to_choice")
    if not (config.get("test_split") or config.get("validation_split")):
        missing.append("test_split (or validation_split)")
    if missing:
        raise MiOptError(f"task file {path} lacks required field(s): {', '.join(missing)}; "
                         f"see mi_opt/tasks/*.yaml for complete examples")
    if config["output_type"] not in OUTPUT_TYPES:
        raise MiOptError(f"task file {path}: output_type {config['output_type']!r} is not one of "
                         f"{', '.join(OUTPUT_TYPES)}")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        resolved = {}
        for split, name in files.items():
            file = Path(name) if Path(name).is_absolute() else path.parent / name
            if not file.is_file():
                raise MiOptError(f"task file {path}: data file {name!r} for split {split!r} does not exist")
            resolved[split] = str(file.resolve())
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": resolved}
    return config


def local_tasks() -> dict[str, Path]:
    """mi-opt's shipped task names -> their YAML files."""
    out = {}
    for file in sorted(TASK_DIR.glob("*.yaml")):
        name = (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("task")
        if name:
            out[name] = file
    return out


def untrusted_files(names: list[str] | tuple[str, ...]) -> list[str]:
    """The task names that are YAML files from outside mi-opt's package."""
    return [n for n in names if n.endswith((".yaml", ".yml")) and not is_packaged(n)]


def resolve_tasks(names: list[str] | tuple[str, ...], trust_task_code: bool = False) -> tuple[list, object]:
    """(task specs for lm-eval, TaskManager) for local names, YAML paths or lm-eval names.

    lm-eval's full index (about 15k names) takes seconds to build, so it is built only when
    a name is neither a local task nor a file.
    """
    from lm_eval.tasks import TaskManager

    local = local_tasks()
    specs, hub = [], []
    for name in names:
        if name in local:
            specs.append(read_task_file(local[name]))
        elif name.endswith((".yaml", ".yml")):
            specs.append(read_task_file(name, trust_task_code))
        else:
            hub.append(name)
            specs.append(name)
    if not hub:
        return specs, TaskManager(include_defaults=False, include_path=[])
    manager = TaskManager()
    unknown = [n for n in hub if n not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(local) + manager.all_tasks, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise MiOptError(f"unknown task(s) {', '.join(map(repr, unknown))}. Offline tasks shipped with mi-opt: "
                         f"{', '.join(local)}; a path to a task .yaml also works, and so does any lm-eval "
                         f"task name (list them with `lm-eval ls tasks`; they download data).{hint}")
    return specs, manager


def _clean(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
        return None if math.isnan(value) else value
    return None


def run_tasks(model, tokenizer, names: list[str] | tuple[str, ...], limit: int | None = None,
              batch_size: int = 8, device: str | torch.device | None = None, seed: int = 0,
              resolved: tuple | None = None, trust_task_code: bool = False, raw: dict | None = None,
              resume_dir: str | Path | None = None) -> dict:
    """{task: {"metrics": {...}, "primary": name, "higher_is_better": {...}, "n": items, "score": interval,
    "items": per-item primary scores, ...}}.

    resolved: resolve_tasks(names) done earlier (evaluate() checks names before any work).
    trust_task_code: render task files from outside mi_opt/tasks without Jinja's sandbox.
    raw: a dict that receives lm-eval's own results (samples left out), for lm-eval's tooling.
    resume_dir: run the tasks one at a time and keep each finished one there, so an evaluation
    cut short (a full one takes half an hour on 2 cores) resumes at the task it stopped in. The
    caller owns the folder: it must belong to this model and settings, and is removed when done.
    """
    from lm_eval.models.huggingface import HFLM

    specs, manager = resolved or resolve_tasks(names, trust_task_code)
    untrusted = [] if trust_task_code else untrusted_files(names)
    if tokenizer.pad_token is None:  # batched generation pads on the left with this token
        tokenizer.pad_token = tokenizer.eos_token
    # lm-eval warns at length that `pretrained` is an object, which is exactly the intent here.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              device=str(device) if device is not None else None)
    if resume_dir is None:
        out = _lm_eval(lm, specs, manager, limit, seed, untrusted)
        if raw is not None:
            raw.update(_without_samples(out))
        return _collect(out)
    from lm_eval.utils import handle_non_serializable

    from mi_opt.artifacts import atomic_write_bytes

    results, merged = {}, {}
    for name, spec in zip(names, specs):
        kept = Path(resume_dir) / f"{_task_key(name, spec, limit, batch_size, seed)}.json"
        if kept.is_file():
            part = json.loads(kept.read_text(encoding="utf-8"))
        else:
            out = _lm_eval(lm, [spec], manager, limit, seed, untrusted)
            part = {"task": name, "tasks": _collect(out), "raw": _without_samples(out)}
            part = json.loads(json.dumps(part, default=handle_non_serializable))  # what a resumed run reads
            atomic_write_bytes(kept, json.dumps(part).encode())
        results.update(part["tasks"])
        merge_lm_eval(merged, part["raw"])
    if raw is not None:
        raw.update(merged)
    return results


def _without_samples(out: dict) -> dict:
    """lm-eval's results as its tooling reads them, less the per-item samples (mi-opt keeps its own)."""
    return {k: v for k, v in out.items() if k != "samples"}


def _task_key(name: str, spec, limit: int | None, batch_size: int, seed: int) -> str:
    """A kept task result's file name: the task as lm-eval received it (an edited task file is a new key)."""
    text = json.dumps([name, spec, limit, batch_size, seed], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def merge_lm_eval(into: dict, part: dict) -> dict:
    """lm-eval's results of one more task merged into `into`: per-task tables (results, configs,
    versions, n-shot...) are joined; run-wide entries (config, date, versions of packages) are
    the first call's."""
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key] = {**into[key], **value}
        else:
            into.setdefault(key, value)
    return into


def _lm_eval(lm, specs: list, manager, limit: int | None, seed: int, untrusted: list[str]) -> dict:
    """lm-eval's simple_evaluate on the wrapped model, greedy and seeded, with mi-opt's errors."""
    from contextlib import nullcontext

    from jinja2.exceptions import SecurityError
    from lm_eval import simple_evaluate

    from mi_opt.evaluate.sandbox import sandboxed_templates

    try:
        with sandboxed_templates() if untrusted else nullcontext():
            # bootstrap_iters > 0 makes lm-eval fill its own *_stderr (closed form for mean metrics).
            out = simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit,
                                  bootstrap_iters=LM_EVAL_BOOTSTRAP, log_samples=True, gen_kwargs={"do_sample": False},
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    except SecurityError as err:
        raise MiOptError(f"a template in {', '.join(untrusted)} reaches Python internals ({err}); task files "
                         f"from outside mi_opt/tasks render in Jinja's sandbox: fix the template, or "
                         f"{TRUST_HINT}") from None
    except (FileNotFoundError, ConnectionError) as err:
        raise MiOptError(f"lm-eval could not load a task's data ({err}); standard lm-eval tasks need a "
                         f"network, mi-opt's own tasks ({', '.join(local_tasks())}) do not") from err
    return out


def _response(sample: dict) -> str:
    resps = sample.get("filtered_resps") or []
    if resps and isinstance(resps[0], (tuple, list)):  # multiple choice: (loglikelihood, greedy) per choice
        return f"choice {max(range(len(resps)), key=lambda i: resps[i][0])}"
    return str(resps[0] if len(resps) == 1 else resps)[:200]


def _collect(out: dict) -> dict:
    results = {}
    for task, row in out["results"].items():
        metrics = {}
        for key, value in row.items():
            metric, _, _filter = key.partition(",")
            if _filter and not metric.endswith("_stderr") and _clean(value) is not None:
                metrics[metric] = _clean(value)
        if not metrics:
            continue
        config = out.get("configs", {}).get(task, {})
        listed = [m["metric"] for m in config.get("metric_list") or [] if m.get("metric") in metrics]
        primary = listed[0] if listed else next(iter(metrics))
        hib = out.get("higher_is_better", {}).get(task, {})
        examples = []
        for sample in (out.get("samples") or {}).get(task, [])[:N_EXAMPLES]:
            prompt = sample["arguments"][0][0] if sample.get("arguments") else ""
            examples.append({"prompt_end": str(prompt)[-120:], "target": str(sample.get("target")),
                             "response": _response(sample), primary: sample.get(primary)})
        items = _items(out, task, primary)
        results[task] = {"metrics": metrics, "primary": primary,
                         **({"score": score_summary(items["score"]), "items": items} if items["score"] else {}),
                         "lm_eval_stderr": _clean(row.get(f"{primary}_stderr,{_filter_of(row, primary)}")),
                         "higher_is_better": {m: bool(hib.get(m, True)) for m in metrics},
                         "n": int(out.get("n-samples", {}).get(task, {}).get("effective", row.get("sample_len", 0)) or 0),
                         "num_fewshot": out.get("n-shot", {}).get(task), "output_type": config.get("output_type"),
                         "examples": examples}
    return results


def _filter_of(row: dict, metric: str) -> str:
    return next((k.partition(",")[2] for k in row if k.partition(",")[0] == metric), "none")


def _items(out: dict, task: str, primary: str) -> dict:
    """Per-item primary scores in doc order, with each prompt's hash: what pairs two models' items."""
    samples = sorted((out.get("samples") or {}).get(task, []), key=lambda s: s["doc_id"])
    rows = [(s["doc_id"], float(s[primary]), str(s.get("prompt_hash", ""))[:16]) for s in samples
            if _clean(s.get(primary)) is not None]
    return {"doc_id": [r[0] for r in rows], "score": [r[1] for r in rows], "prompt_hash": [r[2] for r in rows]}
