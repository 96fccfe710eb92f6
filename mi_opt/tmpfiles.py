"""Temporary files and folders named by the process that owns them, and cleanup of the dead's.

Every output is written under a hidden temporary name and renamed into place, so a kill never
leaves a half-written output; but a SIGKILL (or an OOM kill) leaves the temporary itself, and
an export or a GGUF conversion leaves hundreds of megabytes. The owner's pid is in the name
(`.checkpoint.tmp-<pid>-<random>`), so the next writer of the same output removes leftovers
whose owner is gone and never touches those of a process still running. Outputs also get the
modes the umask asks for: mkdtemp and mkstemp make 0700 folders and 0600 files, which a
shared deployment directory cannot read.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]*")
# Versions before pids were in the names left `.<name>.tmp-XXXXXXXX` and `.<name>.old-XXXXXXXX`
# next to exports and `.<name>-XXXXXXXX` next to GGUF conversions: mkdtemp's 8 random characters
# and no owner to ask. They are removed once older than LEGACY_AGE_S: a live older process could
# still be writing a younger one, and no export or conversion takes an hour without touching it.
_LEGACY_SUFFIX = r"(?:\.(?P<kind>tmp|old))?-[a-z0-9_]{8}"
LEGACY_AGE_S = 3600


def prefix(name: str, kind: str = "tmp") -> str:
    """The hidden name prefix of this process's temporaries for output `name` (kind: tmp or old)."""
    return f".{name}.{kind}-{os.getpid()}-"


def umask_mode(mode: int) -> int:
    """`mode` (0o777 for folders, 0o666 for files) as the current umask restricts it."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def make_dir(parent: Path, name: str) -> Path:
    """A new temporary folder for output parent/name, after removing dead owners' leftovers."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(parent, name)
    return Path(tempfile.mkdtemp(prefix=prefix(name), dir=parent))


def apply_umask(folder: Path) -> None:
    """Give a finished folder and everything in it the umask's modes (writers such as
    safetensors make 0600 files), before it is renamed into place."""
    folder.chmod(umask_mode(0o777))
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(umask_mode(0o777 if path.is_dir() else 0o666))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to clean
        return True
    return True


def _abandoned(entry: Path, name: str) -> str | None:
    """"tmp" or "old" when `entry` is a temporary of output `name` that no live process owns."""
    match = _LEFTOVER.fullmatch(entry.name)
    if match and match["name"] == name:
        return None if _alive(int(match["pid"])) else match["kind"]
    legacy = re.fullmatch(rf"\.{re.escape(name)}{_LEGACY_SUFFIX}", entry.name)
    if legacy and time.time() - entry.lstat().st_mtime > LEGACY_AGE_S:
        return legacy["kind"] or "tmp"
    return None


def remove_leftovers(parent: Path, name: str) -> list[Path]:
    """Remove temporaries of output parent/name whose owning process is gone (or, from versions
    without pids in the names, that are over an hour old); returns what went.

    A `.old` folder is what `export(force=True)` moved aside before renaming the new output in;
    if the kill came between the two renames it is the only copy, so it is put back instead.
    """
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        kind = _abandoned(entry, name)
        if kind is None:
            continue
        if kind == "old" and not (parent / name).exists():
            entry.rename(parent / name)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
