"""Answer extraction and matching for exact-match evals: the number a reply gives, normalisation, numeric equality,
whole-word containment.

Exact match is implemented here, not loaded with `evaluate.load("exact_match")`: that metric is a script fetched from
the Hugging Face Hub on first use, which fails offline (checked with evaluate 0.4.6), and its normalisation options
do not cover numeric answers ("85.0" == "85").
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

from cofitune_peft import CoFiTuneError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s.-]|(?<!\d)\.|\.(?!\d)")


def first_line(text: str) -> str:
    """The first non-empty line of `text`, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


_NUMBER = r"(?<![\w.)])[-−]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|(?<![\w.)])[-−]?\d+(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_PHRASE_RE = re.compile(r"answer(?: is|:)\s*(?:\$|\*\*)?\s*(" + _NUMBER + ")", re.IGNORECASE)
_AFTER_EQUALS_RE = re.compile(r"=\s*(?:\$|\*\*)?\s*(" + _NUMBER + ")")


def _canonical_number(token: str) -> str:
    token = token.replace(",", "").replace("−", "-")
    if "." in token:
        token = token.rstrip("0").rstrip(".")
    negative = token.startswith("-")
    digits = token.lstrip("-").lstrip("0") or "0"
    if digits.startswith("."):
        digits = "0" + digits
    return "-" + digits if negative and digits != "0" else digits


def extract_number(text: str) -> str | None:
    """The number a model's reply gives as its answer, in canonical form, or `None` if it gives none.

    Rules, first match wins: the number after the last "answer is" / "answer:"; the number right after the last
    "="; the last number in the text. Thousands separators are dropped ("1,234" -> "1234"), a leading minus sign
    ("-" or "−") makes a negative number unless it follows a digit ("47-38" is a subtraction), trailing decimal
    zeros go ("85.0" -> "85"). `SpecialityEval.exact_match` uses it for numeric answers.

    Args:
        text (`str`):
            A model's generated reply.

    Returns:
        `str | None`: the canonical number, comparable with the `answer` column of
        `cofitune_peft.kit.data.arithmetic_task`.

    Example:

    ```python
    >>> from cofitune_peft.kit.evaluation import extract_number
    >>> extract_number("47 + 38 = 85")
    '85'
    >>> extract_number("The answer is 1,234.")
    '1234'
    >>> extract_number("12 - 47 = -35")
    '-35'
    >>> extract_number("I don't know.") is None
    True
    ```
    """
    if not isinstance(text, str):
        raise CoFiTuneError(f"`text` must be a string (a generated reply), got {type(text).__name__}.")
    for pattern in (_ANSWER_PHRASE_RE, _AFTER_EQUALS_RE):
        matches = pattern.findall(text)
        if matches:
            return _canonical_number(matches[-1])
    numbers = _NUMBER_RE.findall(text)
    return _canonical_number(numbers[-1]) if numbers else None


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


def token_match(prediction: str | None, reference: str | Sequence[str]) -> bool:
    """Whether `prediction` holds `reference` (or one of several) as a standalone token, case-sensitive.

    For answers that are not words, such as chemical symbols: "The symbol of gold is Au." gives "Au", "Aurum" and
    "AU" do not, and neither does "H2O" give "H" (a token ends at a letter or digit).

    Example:

    ```python
    >>> from cofitune_peft.kit.evaluation import token_match
    >>> token_match("The chemical symbol of gold is Au.", "Au"), token_match("Water is H2O.", "H")
    (True, False)
    ```
    """
    if prediction is None:
        return False
    references = [reference] if isinstance(reference, str) else list(reference)
    return any(r and re.search(rf"(?<![A-Za-z0-9]){re.escape(str(r))}(?![A-Za-z0-9])", prediction) for r in references)
