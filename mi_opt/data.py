"""Calibration and evaluation text, tokenized into deterministic fixed windows.

Sources: bundled corpora (see mi_opt/corpora/SOURCES.md), the full Debian installs, a local
.txt or .jsonl file, `synthetic:arithmetic` (task-style text generated here), or
`hf:NAME[:CONFIG]:SPLIT` for users with a network. Several sources
can be mixed with "+", e.g. "handbook+kjv": windows come from each part in turn. The prefix
`repeat:` ("handbook+repeat:handbook") writes each window's first half twice: text that only
in-context copying predicts well, so a profile sees the heads few-shot prompts depend on.

Every window of a corpus has a fixed role: window i is an evaluation window when
i % EVAL_EVERY == EVAL_EVERY - 1, a calibration window otherwise. The split therefore never
depends on how many samples a run asks for, and calibration never sees evaluation text.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mi_opt.errors import MiOptError

CORPUS_DIR = Path(__file__).parent / "corpora"
EVAL_EVERY = 5
SPLITS = ("calibration", "evaluation")
REPEAT = "repeat:"  # source prefix: windows whose first half is written twice
SYNTHETIC_KINDS = ("arithmetic",)  # synthetic:<kind> sources generated here
BUNDLED_CORPORA = {"kjv": CORPUS_DIR / "kjv.txt", "handbook": CORPUS_DIR / "handbook.txt"}
DEBIAN_HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")


def debian_handbook_text(html_dir: Path = DEBIAN_HANDBOOK) -> str:
    """Paragraphs of the Debian handbook's HTML, tags stripped (also builds the bundled excerpt)."""
    import html

    if not html_dir.is_dir():
        raise MiOptError("corpus 'handbook-full' needs Debian's package: apt-get install debian-handbook")
    paragraphs = []
    for page in sorted(html_dir.glob("*.html")):
        body = re.sub(r"(?s)<(script|style|pre)\b.*?</\1>", " ", page.read_text(encoding="utf-8", errors="replace"))
        for para in re.findall(r'(?s)<div class="para"[^>]*>(.*?)</div>', body):
            text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", para))).strip()
            if len(text) > 80:  # drop captions, navigation and one-line notes
                paragraphs.append(text)
    return "\n\n".join(paragraphs)


def _debian_kjv() -> str:
    import shutil
    import subprocess

    if shutil.which("bible") is None:
        raise MiOptError("corpus 'kjv-full' needs Debian's package: apt-get install bible-kjv")
    raw = subprocess.run(["bible", "-f", "Genesis1:1-Revelation22:21"], capture_output=True,
                         text=True, check=True).stdout
    return "\n".join(re.sub(r"^\S+\d+:\d+\s+", "", line) for line in raw.splitlines())


def _utf8_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MiOptError(f"text file {path} is not UTF-8 ({err.reason} at byte {err.start}); convert it, "
                         f"e.g. iconv -f latin1 -t utf-8") from None


def _read_file(path: Path) -> str:
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(_utf8_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise MiOptError(f"{path}:{n}: each JSONL line needs a string field 'text' ({err})") from err
        return "\n\n".join(texts)
    return _utf8_text(path)


def _hf_parts(spec: str) -> tuple[str, str | None, str]:
    parts = spec.split(":")[1:]
    if len(parts) not in (2, 3) or not all(parts):
        raise MiOptError(f"HF dataset source {spec!r} must look like hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    return (parts[0], None, parts[1]) if len(parts) == 2 else tuple(parts)


def _hf_dataset(spec: str) -> str:
    name, config, split = _hf_parts(spec)
    try:
        import datasets
    except ImportError:
        raise MiOptError(f"source {spec!r} needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except (OSError, ValueError) as err:  # no network (ConnectionError), no such dataset, config or split
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise MiOptError(f"could not load {spec!r} from the Hugging Face hub ({reason}); hf: sources need a "
                         "network and an existing dataset, config and split; offline, use a .txt/.jsonl file") from None
    if "text" not in ds.column_names:
        raise MiOptError(f"{spec!r} has no 'text' column (it has {', '.join(ds.column_names)}); export the text "
                         "to a .txt/.jsonl file")
    return "\n\n".join(row["text"] for row in ds if row["text"].strip())


def _synthetic(kind: str, n_lines: int = 6000, seed: int = 1234) -> str:
    """Task-style text generated here, for task-aware calibration without touching test items.

    "arithmetic": lines "a + b = c" (a, b below 60), grouped in blocks like few-shot prompts;
    no pair of the miopt_arithmetic test items appears, in either order.
    """
    from mi_opt.evaluate.task_data import held_out_sums

    if kind not in SYNTHETIC_KINDS:
        raise MiOptError(f"unknown synthetic corpus {kind!r}; available: synthetic:arithmetic")
    g = torch.Generator().manual_seed(seed)
    held_out = held_out_sums()
    # Draw with room to spare, then drop test pairs (362 of the 3,600 possible).
    pairs = [p for p in torch.randint(0, 60, (2 * n_lines, 2), generator=g).tolist() if tuple(p) not in held_out]
    lines = [f"{a} + {b} = {a + b}" for a, b in pairs[:n_lines]]
    return "\n\n".join("\n".join(lines[i:i + 4]) for i in range(0, len(lines), 4))


def _unknown_source(source: str) -> MiOptError:
    return MiOptError(
        f"unknown text source {source!r}: use a bundled corpus ({', '.join(BUNDLED_CORPORA)}), "
        "handbook-full / kjv-full (Debian packages), a .txt/.jsonl file, or hf:NAME:SPLIT")


def _is_mix(source: str) -> bool:
    return "+" in source and not Path(source).exists()  # a file may have '+' in its name


def check_source(source: str) -> None:
    """Raise what load_text would for a source that cannot resolve, without reading any text.

    For `mi-opt validate`: bundled names, the Debian installs, existing files, `synthetic:`
    kinds and `repeat:` / `+` forms are checked here; an `hf:` source is only checked for its
    shape, since whether it downloads depends on the network at run time.
    """
    if _is_mix(source):
        for part in source.split("+"):
            check_source(part)
        return
    source = source.removeprefix(REPEAT)
    if source in BUNDLED_CORPORA:
        return
    if source == "handbook-full":
        if not DEBIAN_HANDBOOK.is_dir():
            raise MiOptError("corpus 'handbook-full' needs Debian's package: apt-get install debian-handbook")
        return
    if source == "kjv-full":
        import shutil

        if shutil.which("bible") is None:
            raise MiOptError("corpus 'kjv-full' needs Debian's package: apt-get install bible-kjv")
        return
    if source.startswith("hf:"):
        _hf_parts(source)
        return
    if source.startswith("synthetic:"):
        if source.split(":", 1)[1] not in SYNTHETIC_KINDS:
            raise MiOptError(f"unknown synthetic corpus {source!r}; available: "
                             f"{', '.join('synthetic:' + k for k in SYNTHETIC_KINDS)}")
        return
    if not Path(source).expanduser().is_file():
        raise _unknown_source(source)


def load_text(source: str) -> str:
    """The raw text of one source, or of several joined with '+'."""
    if _is_mix(source):
        return "\n\n".join(load_text(part) for part in source.split("+"))
    if source in BUNDLED_CORPORA:
        return BUNDLED_CORPORA[source].read_text(encoding="utf-8")
    if source == "handbook-full":
        return debian_handbook_text()
    if source == "kjv-full":
        return _debian_kjv()
    if source.startswith("hf:"):
        return _hf_dataset(source)
    if source.startswith("synthetic:"):
        return _synthetic(source.split(":", 1)[1])
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path)
    raise _unknown_source(source)


def _uses_bos(tokenizer) -> bool:
    # Models trained with a BOS token (Gemma) behave badly without one at position 0.
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def repeat_halves(windows: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Each window's text after `offset` (a BOS) cut in half and its first half written twice.

    Predicting the repeat is easy only by copying from context, the job of induction heads
    (Olsson et al., 2022), which few-shot prompts lean on and prose loss barely exercises.
    """
    body = windows[:, offset:]
    half = (body.shape[1] + 1) // 2
    return torch.cat([windows[:, :offset], body[:, :half], body[:, :body.shape[1] - half]], dim=1)


def _all_windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    use_bos = _uses_bos(tokenizer)
    body = seq_len - 1 if use_bos else seq_len
    n = len(ids) // body
    windows = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if use_bos:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def _touches_evaluation(n: int, body: int, eval_body: int) -> torch.Tensor:
    """For n windows of `body` tokens laid end to end, whether each shares a token with an
    evaluation window of the grid of `eval_body`-token windows (window j is evaluation iff
    j % EVAL_EVERY == EVAL_EVERY - 1)."""
    start = torch.arange(n) * body
    first, last = start // eval_body, (start + body - 1) // eval_body
    evaluation_up_to = lambda j: (j + 1) // EVAL_EVERY  # noqa: E731 - how many such j lie in [0, j]
    return evaluation_up_to(last) - evaluation_up_to(first - 1) > 0


def token_windows(tokenizer, source: str, n_samples: int, seq_len: int, split: str = "calibration",
                  seed: int = 0, max_positions: int | None = None, cycle: bool = False,
                  avoid_eval_len: int | None = None) -> torch.Tensor:
    """A (n_samples, seq_len) LongTensor of non-overlapping windows from one split.

    Deterministic for a fixed (source, tokenizer, seq_len, seed). Raises a clear error when
    seq_len exceeds the model's context or the corpus has too few windows, unless `cycle`
    (training data): then every window is used once per epoch, each epoch in a new order.
    avoid_eval_len: calibration windows that share any token with an evaluation window of that
    length are left out too. The split is per window index at each length, so without it a
    calibration window of another length can hold evaluation text (training needs the guarantee).
    """
    if split not in SPLITS:
        raise MiOptError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if seq_len < 2 or n_samples < 1:
        raise MiOptError(f"need seq_len >= 2 and n_samples >= 1 (got seq_len={seq_len}, n_samples={n_samples})")
    if max_positions and seq_len > max_positions:
        raise MiOptError(f"seq_len {seq_len} exceeds the model's context of {max_positions} tokens; lower seq_len")
    # A mix "a+b" draws windows from each part in turn, so a small corpus (task-style text)
    # is as present in the windows as a large one, whatever their sizes.
    parts = source.split("+") if _is_mix(source) else [source]
    generator = torch.Generator().manual_seed(seed)
    pools = []
    for part in parts:
        repeated = part.startswith(REPEAT)
        windows = _all_windows(tokenizer, load_text(part.removeprefix(REPEAT)), seq_len)
        if repeated:
            windows = repeat_halves(windows, offset=1 if _uses_bos(tokenizer) else 0)
        is_eval = (torch.arange(len(windows)) % EVAL_EVERY) == EVAL_EVERY - 1
        if split == "calibration" and avoid_eval_len:
            bos = 1 if _uses_bos(tokenizer) else 0
            is_eval |= _touches_evaluation(len(windows), seq_len - bos, avoid_eval_len - bos)
        pool = windows[is_eval] if split == "evaluation" else windows[~is_eval]
        pools.append(pool[torch.randperm(len(pool), generator=generator)])
    available = sum(len(p) for p in pools)
    if cycle and 0 < available < n_samples:
        # Each part is cycled on its own, in a new order per epoch, so a mix keeps its proportions.
        epochs = -(-n_samples // available)
        pools = [torch.cat([p] + [p[torch.randperm(len(p), generator=generator)] for _ in range(epochs - 1)])
                 for p in pools]
    elif available < n_samples:
        raise MiOptError(
            f"corpus {source!r} has only {available} {split} windows of {seq_len} tokens, "
            f"{n_samples} requested; lower n_samples or seq_len, or add text")
    order = [(i, j) for i in range(max(len(p) for p in pools)) for j in range(len(pools)) if i < len(pools[j])]
    return torch.stack([pools[j][i] for i, j in order[:n_samples]])
