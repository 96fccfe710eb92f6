"""Rebuild the bundled corpora in mi_opt/corpora/ from Debian packages.

    apt-get install bible-kjv debian-handbook
    python scripts/build_corpora.py

Sources and licenses (also in mi_opt/corpora/SOURCES.md):
- kjv.txt: the King James Version (1611), public domain, as shipped by Debian's
  `bible-kjv-text` and read with its `bible` command.
- handbook.txt: "The Debian Administrator's Handbook" (Hertzog, Mas), GPL-2.0+ or
  CC-BY-SA-3.0, from Debian's `debian-handbook` HTML (en-US), tags stripped.
We bundle an excerpt of each so a fresh machine needs no apt step; the loaders in
mi_opt/data.py also read the full Debian installs when present.
"""
import re
import subprocess
from pathlib import Path

from mi_opt.data import debian_handbook_text

OUT = Path(__file__).resolve().parent.parent / "mi_opt" / "corpora"
HANDBOOK_HTML = Path("/usr/share/doc/debian-handbook/html/en-US")
MAX_CHARS = 400_000
# Books spread across the canon so the excerpt is not one narrative voice.
KJV_BOOKS = ["Genesis", "Exodus", "Ruth", "1Samuel", "Job", "Psalms", "Proverbs",
             "Isaiah", "Matthew", "Luke", "John", "Acts", "Romans", "Hebrews"]


def kjv_text() -> str:
    paragraphs = []
    for book in KJV_BOOKS:
        raw = subprocess.run(["bible", "-f", f"{book}1:1-150:200"], capture_output=True,
                             text=True, check=True).stdout
        verses = [re.sub(r"^\S+\d+:\d+\s+", "", line).strip() for line in raw.splitlines()]
        verses = [v for v in verses if v]
        # A chapter-sized paragraph every 12 verses keeps windows mixing verse boundaries.
        paragraphs += [" ".join(verses[i:i + 12]) for i in range(0, len(verses), 12)]
    return "\n\n".join(paragraphs)


def handbook_text() -> str:
    return debian_handbook_text(HANDBOOK_HTML)


def clip(text: str) -> str:
    """Spread the excerpt over the whole source: every k-th paragraph until MAX_CHARS."""
    paragraphs = text.split("\n\n")
    step = max(1, round(len(text) / MAX_CHARS))
    kept = paragraphs[::step]
    out, size = [], 0
    for p in kept:
        if size + len(p) > MAX_CHARS:
            break
        out.append(p)
        size += len(p) + 2
    return "\n\n".join(out) + "\n"


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, build in [("kjv", kjv_text), ("handbook", handbook_text)]:
        text = clip(build())
        (OUT / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"{name}: {len(text):,} chars")
