"""Versatility probes: country capitals from the factbook, as short answers or 4-way multiple choice.

SmolLM2-135M-Instruct knows many capitals, so they are general knowledge a fine-tune can make it lose. Only cleanly
named, single capitals are used, and none that the question gives away.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cofitune_peft import CoFiTuneError

from ..evaluation.answers import answers_match
from .factbook import _factbook, _normalise, _text

if TYPE_CHECKING:
    from datasets import Dataset

# The factbook's "conventional short form" that reads wrongly in a question.
_COUNTRY_NAME_FIXES = {"dr": "Dominican Republic"}
# Names that take "the" in English: "the capital of the United Kingdom", "... of the Philippines".
_ARTICLE_WORDS = {"Emirates", "Islands", "Kingdom", "Republic", "States"}
_ARTICLE_NAMES = {"Bahamas", "Gambia", "Maldives", "Netherlands", "Philippines"}

_NAME_CONNECTORS = {"al", "au", "de", "del", "es", "la", "of", "the"}


def _country_name(code: str, entry: dict) -> str | None:
    if code in _COUNTRY_NAME_FIXES:
        return _COUNTRY_NAME_FIXES[code]
    short = _text(entry, "Government", "Country name", "conventional short form")
    long = _text(entry, "Government", "Country name", "conventional long form")
    if not short or short.lower() == "none" or short.isupper() or "(" in short or "," in short:
        short = long
    if not short or "(" in short or "," in short or short.lower() == "none":
        return None
    return short.removeprefix("The ")


def _with_article(country: str) -> str:
    words = country.split()
    return f"the {country}" if country in _ARTICLE_NAMES or _ARTICLE_WORDS & set(words) else country


def _capital_name(raw: str) -> tuple[str, list[str]] | None:
    """`(name, aliases)` of a single, cleanly named capital, or `None` for several capitals, notes or no capital."""
    if re.search(r";|\bcapital\b|\bnote\b|\bofficial\b|administered|located", raw, re.IGNORECASE):
        return None
    aliases = []
    match = re.fullmatch(r"([^()]+?)\s*\(([^()]*)\)", raw)
    if match:
        raw, inside = match.group(1), match.group(2)
        if inside[:1].isupper():  # "Tashkent (Toshkent)", not "Suva (on Viti Levu)" nor "San Marino (city)"
            for alias in re.split(r"[,/]", inside):
                words = []
                for word in alias.split():  # "Kiev is the transliteration from Russian" -> "Kiev"
                    if word[:1].islower() and word not in _NAME_CONNECTORS:
                        break
                    words.append(word)
                if words:
                    aliases.append(" ".join(words))
    if "(" in raw or ")" in raw:
        return None
    if "," in raw:
        if not re.fullmatch(r"[A-Z][a-z]+, D\.C\.", raw):  # Washington, D.C.
            return None
        aliases.append(raw.split(",")[0])
    if any(w[:1].islower() and w not in _NAME_CONNECTORS for w in raw.split()):  # "Chisinau in Romanian"
        return None
    return raw, aliases


@functools.lru_cache(maxsize=2)
def _capital_table(include_dependencies: bool) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """`(country, capital, aliases)` for every entry with one clean capital that the question does not give away."""
    table = []
    for code, entry in _factbook():
        if not include_dependencies and "Dependency status" in entry.get("Government", {}):
            continue
        raw_capital = _text(entry, "Government", "Capital", "name")
        country = _country_name(code, entry)
        if not raw_capital or not country:
            continue
        parsed = _capital_name(raw_capital)
        if parsed is None:
            continue
        capital, aliases = parsed
        raw_short = _text(entry, "Government", "Country name", "conventional short form") or ""
        # "What is the capital of Singapore?" gives the answer away; so does "Holy See (Vatican City)".
        names = {_normalise(country), _normalise(raw_short)} - {""}
        if any(n in _normalise(capital) or _normalise(capital) in n for n in names):
            continue
        table.append((country, capital, tuple(aliases)))
    return tuple(table)


def answer_matches(text: str, answers: str | Sequence[str]) -> bool:
    """Whether a generated reply contains one of the accepted answers as whole words.

    Case, accents, articles and punctuation are ignored, so "The capital of Colombia is Bogota." matches "Bogotá".
    The same test as `answers_match(text, answers, contains=True)`, which the versatility eval scores probes with.

    Args:
        text (`str`):
            A model's generated reply.
        answers (`str` or `Sequence[str]`):
            The accepted answers, e.g. `[row["answer"], *row["aliases"]]` of a `capital_probes(kind="short")` row.

    Returns:
        `bool`: `True` if any accepted answer occurs in the reply.

    Example:

    ```python
    >>> from cofitune_peft.kit.data import answer_matches
    >>> answer_matches("The capital of Colombia is Bogota.", ["Bogotá"])
    True
    >>> answer_matches("Parisian cafés are famous.", "Paris")
    False
    ```
    """
    return answers_match(text, answers, contains=True)


def capital_probes(
    n: int = 40,
    seed: int = 0,
    kind: str = "short",
    include_dependencies: bool = False,
) -> Dataset:
    """Country-capital questions from the CIA World Factbook, a versatility probe a fine-tuned model can forget.

    Only entries with one cleanly named capital are used (no "Pretoria (administrative capital); Cape Town ...", no
    notes), and none whose capital repeats the country's name (Singapore, Kuwait City). The same `seed` and `n` pick
    the same countries for both kinds.

    Args:
        n (`int`, *optional*, defaults to `40`):
            Number of probes (at most ~165 sovereign entries, ~200 with dependencies).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the country sample and of the distractors.
        kind (`str`, *optional*, defaults to `"short"`):
            `"short"`: columns `prompt`, `answer`, `aliases` (other accepted spellings), `country`; score a generated
            reply with `answer_matches(reply, [answer, *aliases])`.
            `"mc"`: columns `prompt`, `answer`, `options` (4 capitals, the answer and 3 distractor capitals of other
            countries, shuffled), `label` (index of the answer in `options`), `country`; score by the log-likelihood
            of each option as the assistant's reply to `prompt`.
        include_dependencies (`bool`, *optional*, defaults to `False`):
            Whether to include dependent territories (Guernsey, Aruba, ...), which small models know less well.

    Returns:
        `datasets.Dataset`: the probes.

    Example:

    ```python
    >>> from cofitune_peft.kit.data import capital_probes
    >>> short = capital_probes(n=5, seed=0)
    >>> short[0]["prompt"].startswith("What is the capital of ")
    True
    >>> mc = capital_probes(n=5, seed=0, kind="mc")
    >>> row = mc[0]
    >>> row["options"][row["label"]] == row["answer"], len(row["options"])
    (True, 4)
    ```
    """
    from datasets import Dataset

    if kind not in ("short", "mc"):
        raise CoFiTuneError(f"`kind` must be 'short' or 'mc', got {kind!r}.")
    table = list(_capital_table(bool(include_dependencies)))
    if not isinstance(n, int) or not 1 <= n <= len(table):
        hint = "" if include_dependencies else " or set `include_dependencies=True`"
        raise CoFiTuneError(
            f"`n` must be an integer in [1, {len(table)}] (factbook entries with one clean capital), got {n!r}; "
            f"lower `n`{hint}."
        )
    rng = random.Random(seed)
    chosen = rng.sample(table, n)
    rows: dict[str, list] = {"prompt": [], "answer": [], "country": []}
    if kind == "short":
        rows["aliases"] = []
    else:
        rows["options"], rows["label"] = [], []
    capitals = sorted({capital for _, capital, _ in table})
    for country, capital, aliases in chosen:
        rows["prompt"].append(f"What is the capital of {_with_article(country)}?")
        rows["answer"].append(capital)
        rows["country"].append(country)
        if kind == "short":
            rows["aliases"].append(list(aliases))
            continue
        options = [capital, *rng.sample([c for c in capitals if c != capital], 3)]
        rng.shuffle(options)
        rows["options"].append(options)
        rows["label"].append(options.index(capital))
    return Dataset.from_dict(rows)
