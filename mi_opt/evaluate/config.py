"""EvalConfig: every setting an evaluation depends on, recorded in eval.json."""
from __future__ import annotations

from dataclasses import dataclass, field

from mi_opt.errors import MiOptError

PARTS = ("perplexity", "tasks", "speed")
# The shipped offline tasks (mi_opt/tasks/*.yaml): one multiple-choice and four generative of
# different kinds (computation, recall, in-context copying, sequences), because compression
# hurts generation far more than multiple choice.
DEFAULT_TASKS = ("miopt_facts_mc", "miopt_arithmetic", "miopt_capitals", "miopt_name_lookup", "miopt_sequences")


@dataclass
class SpeedConfig:
    batch_size: int = 1        # sequences decoded together
    prompt_len: int = 128      # tokens of prompt (prefill)
    new_tokens: int = 32       # greedy tokens decoded with the KV cache
    warmup: int = 1            # untimed runs first: allocator and kernel caches settle
    repetitions: int = 5       # timed runs; median and min/max reported
    seed: int = 0              # the random prompt's seed

    def __post_init__(self):
        for name in ("batch_size", "prompt_len", "new_tokens", "repetitions"):
            if int(getattr(self, name)) < 1:
                raise MiOptError(f"speed {name} must be >= 1 (got {getattr(self, name)})")
        if self.new_tokens < 2:
            raise MiOptError("speed new_tokens must be >= 2: the first token is time to first token, "
                             "decode speed needs at least one more")
        if self.warmup < 0:
            raise MiOptError(f"speed warmup must be >= 0 (got {self.warmup})")


@dataclass
class EvalConfig:
    parts: tuple[str, ...] = PARTS            # which measurements to run
    # perplexity: windows of the "evaluation" split, never calibration text
    text_source: str = "handbook"
    ppl_samples: int = 16
    ppl_seq_len: int = 256
    ppl_batch_size: int = 4
    seed: int = 0
    # tasks: local mi-opt task names, paths to task YAML files, or lm-eval task names
    tasks: tuple[str, ...] = DEFAULT_TASKS
    task_limit: int | None = None             # items per task; None = all (about 200 each): quick runs only
    task_batch_size: int = 8
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    threads: int | None = None                # torch threads during evaluation; None = current
    device: str | None = None                 # where inputs go; None = the model's device

    def __post_init__(self):
        if isinstance(self.speed, dict):
            self.speed = SpeedConfig(**self.speed)
        self.parts = tuple(self.parts)
        self.tasks = tuple(self.tasks)
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise MiOptError(f"unknown evaluation part(s) {unknown or '(none given)'}; choose from {', '.join(PARTS)}")
        if "perplexity" in self.parts and (self.ppl_samples < 1 or self.ppl_seq_len < 2 or self.ppl_batch_size < 1):
            raise MiOptError(f"perplexity needs ppl_samples >= 1, ppl_seq_len >= 2, ppl_batch_size >= 1 "
                             f"(got {self.ppl_samples}, {self.ppl_seq_len}, {self.ppl_batch_size})")
        if "tasks" in self.parts and not self.tasks:
            raise MiOptError("the 'tasks' part needs at least one task name; drop 'tasks' from parts to skip it")
        if self.task_limit is not None and self.task_limit < 1:
            raise MiOptError(f"task_limit must be >= 1 or None for all items (got {self.task_limit})")
        if self.task_batch_size < 1:
            raise MiOptError(f"task_batch_size must be >= 1 (got {self.task_batch_size})")
        if self.threads is not None and self.threads < 1:
            raise MiOptError(f"threads must be >= 1 (got {self.threads})")
