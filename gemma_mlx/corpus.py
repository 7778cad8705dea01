"""Real text for distillation (`gemma-mlx distill --corpus PATH`): documents read from files, cut into windows of
tokens that the target is teacher-forced over (one prefill per batch of windows, far cheaper per token than decoding).

    docs = documents(["/usr/share/doc/python3.11/html/_sources", "notes.txt"])
    for window in windows(engine.encode, docs, length=256, seed=0): ...

A path is a text file or a directory searched recursively for them: every file that decodes as UTF-8 and holds no
NUL byte, whatever its name, except the suffixes in SKIP (indexes, archives, images). Fortune files (entries
separated by lines holding a single `%`) become documents of consecutive entries joined by blank lines.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Callable, Iterable

SKIP = {".dat", ".gz", ".bz2", ".xz", ".zip", ".png", ".jpg", ".gif", ".svg", ".pdf", ".pyc", ".so", ".u8", ".js",
        ".css", ".html", ".inv", ".woff", ".ttf", ".ico", ".json", ".safetensors"}
MIN_WINDOW = 32  # tokens: shorter tails are dropped
FORTUNES_PER_DOC = 2000  # characters of consecutive fortune entries per document
_FORTUNE_SEPARATOR = re.compile(r"\n%\n")


class CorpusError(ValueError):
    """A corpus path that cannot be used; the message is one line for the user."""


def files(paths: Iterable[str | Path]) -> list[Path]:
    """The candidate text files under `paths`, sorted (so a corpus reads the same way every time)."""
    out = []
    for p in map(lambda x: Path(x).expanduser(), paths):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() not in SKIP)
        else:
            raise CorpusError(f"{p}: no such file or directory (--corpus takes text files or directories)")
    return out


def read_text(path: Path) -> str | None:
    """The file's text, or None when it is not text (not UTF-8, or holds NUL bytes)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def documents(paths: Iterable[str | Path]) -> list[str]:
    """Every text document under `paths` (fortune files regrouped, `fortune_documents`); empty ones dropped."""
    docs = []
    for f in files(paths):
        text = read_text(f)
        if text is None or not text.strip():
            continue
        docs += fortune_documents(text) if text.count("\n%\n") > 2 else [text.strip("\n")]
    if not docs:
        raise CorpusError("the corpus holds no text files (UTF-8, without NUL bytes)")
    return docs


def fortune_documents(text: str) -> list[str]:
    """A fortune file's entries, consecutive ones joined by blank lines into documents of ~FORTUNES_PER_DOC chars."""
    docs, current = [], ""
    for entry in (e.strip("\n") for e in _FORTUNE_SEPARATOR.split(text)):
        if entry.strip() and entry != "%":
            current = f"{current}\n\n{entry}" if current else entry
        if len(current) >= FORTUNES_PER_DOC:
            docs.append(current)
            current = ""
    return docs + ([current] if current else [])


def windows(encode: Callable[[str], list[int]], docs: list[str], length: int, seed: int) -> list[list[int]]:
    """Each document tokenized (`encode` puts the BOS first) and cut into windows of at most `length` tokens,
    shuffled. A window after a document's first starts with the BOS again, as every prompt the target sees does."""
    out = []
    for doc in docs:
        ids = encode(doc)
        bos, body = ids[0], ids[1:]
        for s in range(0, len(body), length - 1):
            piece = body[s : s + length - 1]
            if len(piece) + 1 >= MIN_WINDOW:
                out.append([bos] + piece)
    random.Random(seed).shuffle(out)
    return out
