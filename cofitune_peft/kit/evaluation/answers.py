"""Answer matching for exact-match evals: normalisation, numeric equality, whole-word containment.

Exact match is implemented here, not loaded with `evaluate.load("exact_match")`: that metric is a script fetched from
the Hugging Face Hub on first use, which fails offline (checked with evaluate 0.4.6), and its normalisation options
do not cover numeric answers ("85.0" == "85").
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s.-]|(?<!\d)\.|\.(?!\d)")


def first_line(text: str) -> str:
    """The first non-empty line of `text`, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def normalize_answer(text: str) -> str:
    """Lower case, no accents, no articles, no punctuation (decimal points kept), single spaces."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = _ARTICLES.sub(" ", text.lower())
    return " ".join(_PUNCT.sub(" ", text).split())


def _as_number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(str(text).strip().replace(",", ""))
    except ValueError:
        return None


def answers_match(
    prediction: str | None, reference: str | Sequence[str], numeric: bool = False, contains: bool = False
) -> bool:
    """Whether `prediction` gives `reference` (or one of several accepted answers).

    Numeric equality (`1e-6` relative) when `numeric`; otherwise, after `normalize_answer`, equality, or with
    `contains` the reference as whole words anywhere in the prediction ("The capital is Paris." gives "Paris").
    """
    if prediction is None:
        return False
    references = [reference] if isinstance(reference, str) else list(reference)
    if numeric:
        a = _as_number(prediction)
        return a is not None and any(
            (b := _as_number(r)) is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for r in references
        )
    got = normalize_answer(prediction)
    wanted = [normalize_answer(str(r)) for r in references]
    if contains:
        return any(w and f" {w} " in f" {got} " for w in wanted)
    return got in wanted
