"""What the `cofitune` sub-commands share: reading their input files (JSON lines, general prose)."""

from __future__ import annotations

import json
import os

from cofitune_peft import CoFiTuneError


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise CoFiTuneError(f"no file at {path!r}.")


def read_jsonl(path: str) -> list[dict]:
    """The objects of a JSON-lines file (blank lines skipped); `CoFiTuneError` for a missing or empty file."""
    _check_file(path)
    with open(path) as fh:
        items = [json.loads(line) for line in fh if line.strip()]
    if not items:
        raise CoFiTuneError(f"{path!r} holds no JSON lines.")
    return items


def read_text_chunks(path: str, min_chars: int = 800) -> list[str]:
    """Blank-line separated paragraphs of a text file, merged into chunks of at least `min_chars` characters (the
    last one may be shorter); an empty list for a file without text."""
    _check_file(path)
    with open(path) as fh:
        paragraphs = [p.strip() for p in fh.read().split("\n\n") if p.strip()]
    chunks, current = [], ""
    for p in paragraphs:
        current = f"{current}\n\n{p}" if current else p
        if len(current) >= min_chars:
            chunks.append(current)
            current = ""
    return chunks + ([current] if current else [])
