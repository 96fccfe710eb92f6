"""`mi-opt eval MODEL`: perplexity, benchmark tasks and speed of one model; writes eval.json."""
from __future__ import annotations

import argparse
from pathlib import Path

from mi_opt.errors import MiOptError


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Evaluation settings, shared with `mi-opt compare` (which evaluates models it is given)."""
    from mi_opt.evaluate.config import DEFAULT_TASKS, PARTS

    g = p.add_argument_group("evaluation settings")
    g.add_argument("--parts", default=",".join(PARTS), help=f"comma list from {','.join(PARTS)}")
    g.add_argument("--data", default="handbook", help="perplexity text: handbook, kjv, a+b, file.txt/.jsonl")
    g.add_argument("--ppl-samples", type=int, default=16, help="evaluation windows for perplexity")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per perplexity window")
    g.add_argument("--batch-size", type=int, default=4, help="perplexity windows per forward")
    g.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help="comma list: mi-opt task names, task .yaml paths, or lm-eval task names (need a network)")
    g.add_argument("--limit", type=int, default=0,
                   help="items per task (default 0 = all; a limit widens every interval: quick runs only)")
    g.add_argument("--task-batch-size", type=int, default=8)
    g.add_argument("--speed-batch", type=int, default=1, help="sequences per speed run")
    g.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for prefill timing")
    g.add_argument("--new-tokens", type=int, default=32, help="greedy tokens for decode timing")
    g.add_argument("--warmup", type=int, default=1, help="untimed speed runs")
    g.add_argument("--reps", type=int, default=5, help="timed speed runs")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (recorded; default: torch's)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (accelerate device_map)")
    add_trust_arguments(p, task_code=True)


def add_trust_arguments(p: argparse.ArgumentParser, task_code: bool = False) -> None:
    """The opt-ins to running code that came with data (a model folder, a task file): off by default."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python files a model folder ships (its config's auto_map); only for authors you trust")
    if task_code:
        p.add_argument("--trust-task-code", action="store_true",
                       help="let task files from outside mi-opt import Python (!function) and render templates "
                            "unsandboxed; only for authors you trust")


def config_from_args(args: argparse.Namespace):
    from mi_opt.evaluate import EvalConfig, SpeedConfig

    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    config = EvalConfig(parts=split(args.parts), text_source=args.data, ppl_samples=args.ppl_samples,
                      ppl_seq_len=args.seq_len, ppl_batch_size=args.batch_size, seed=args.seed,
                      tasks=split(args.tasks), task_limit=args.limit or None, task_batch_size=args.task_batch_size,
                      speed=SpeedConfig(batch_size=args.speed_batch, prompt_len=args.prompt_len,
                                        new_tokens=args.new_tokens, warmup=args.warmup, repetitions=args.reps,
                                        seed=args.seed),
                      threads=args.threads, device=None if args.device == "auto" else args.device)
    if "tasks" in config.parts:  # a misspelled task fails before any model is loaded
        from mi_opt.evaluate.tasks import resolve_tasks

        resolve_tasks(config.tasks, args.trust_task_code)
    return config


def load_any(spec: str, dtype: str = "fp32", device: str = "cpu", trust_remote_code: bool = False):
    """(model, tokenizer, folder or None) for a bundled name, folder, mi-opt export, .gguf or hub id.

    mi-opt exports (a folder with the compression sidecar) go through load_compressed, which
    rebuilds per-layer head counts, MLP sizes and quantized modules plain transformers cannot express.
    """
    from mi_opt.models import load_model, resolve_model_path

    try:
        path = Path(spec).expanduser()
        from mi_opt.export import SIDECAR

        if path.is_dir() and (path / SIDECAR).is_file():
            from transformers import AutoTokenizer

            from mi_opt.export import load_compressed

            model = load_compressed(path, device=device)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            return model, tokenizer, path
        model, tokenizer = load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        folder, gguf = resolve_model_path(spec)
    except MiOptError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers and hub raise many types; all mean "cannot load"
        raise MiOptError(f"could not load model {spec!r}: {type(err).__name__}: {err}") from err
    if gguf:
        return model, tokenizer, Path(folder) / gguf
    return model, tokenizer, Path(folder) if Path(str(folder)).is_dir() else None


def evaluate_spec(spec: str, args: argparse.Namespace, config=None):
    """Load a model by spec and evaluate it with the settings in args (or `config`)."""
    return evaluate_loaded(spec, args, config)[0]


def evaluate_loaded(spec: str, args: argparse.Namespace, config=None):
    """(EvalResult, model): as evaluate_spec, keeping the model for a later A/B timing."""
    from mi_opt.evaluate import evaluate

    config = config or config_from_args(args)
    model, tokenizer, on_disk = load_any(spec, args.dtype, args.device, args.trust_remote_code)
    folder = on_disk if on_disk is not None and on_disk.is_dir() else None
    result = evaluate(model, tokenizer, config, spec=spec, folder=folder, trust_task_code=args.trust_task_code)
    result.model["dtype_loaded"] = args.dtype
    if on_disk is not None and on_disk.is_file() and result.speed:  # a GGUF: its bytes on disk are the file
        result.speed.update(size_bytes=on_disk.stat().st_size, size_kind="disk (gguf)")
    return result, model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="bundled name, model folder, exported checkpoint, .gguf file or hub id")
    p.add_argument("--out", default="eval.json", help="where to write the result")
    add_eval_arguments(p)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.is_dir():
        out = out / "eval.json"
    config = config_from_args(args)  # bad settings fail before a model is loaded
    result = evaluate_spec(args.model, args, config)
    path = result.save(out)
    print(summary(result))
    print(f"eval: {path}")
    return 0


def summary(result) -> str:
    lines = []
    if result.perplexity:
        p = result.perplexity
        spread = f" [{p['interval'][0]:.3f}, {p['interval'][1]:.3f}]" if p.get("interval") else ""
        bpb = p.get("bits_per_byte_interval")
        bpb_spread = f" [{bpb[0]:.4f}, {bpb[1]:.4f}]" if bpb else ""
        lines.append(f"perplexity {p['perplexity']:.3f}{spread}  bits/byte {p['bits_per_byte']:.4f}{bpb_spread}  "
                     f"({p['n_tokens']} tokens of {p['source']!r}, evaluation split)")
    for name, t in result.tasks.items():
        score = t.get("score")
        spread = f" [{score['interval'][0]:.3f}, {score['interval'][1]:.3f}]" if score else ""
        lines.append(f"{name}: {t['primary']} {t['metrics'][t['primary']]:.3f}{spread} "
                     f"(n={t['n']}, {t['num_fewshot']}-shot)")
    if result.perplexity or result.tasks:
        lines.append("[low, high]: 95% interval (exact binomial for right/wrong scores; perplexity across windows)")
    if result.speed:
        s = result.speed
        lines.append(f"prefill {s['prefill_ms']['median']:.1f} ms  ttft {s['ttft_ms']['median']:.1f} ms  "
                     f"decode {s['decode_tokens_per_s']['median']:.1f} tok/s  peak memory "
                     f"{s['peak_memory_bytes'] / 1e6:.0f} MB  params {s['parameters'] / 1e6:.1f} M  "
                     f"size {s['size_bytes'] / 1e6:.1f} MB ({s['size_kind']})  threads {s['threads']}")
    return "\n".join(lines)
