"""Versatility probes: country capitals from the factbook and chemical symbols, as short answers or 4-way multiple
choice.

SmolLM2-135M-Instruct knows many capitals and symbols, so they are general knowledge a fine-tune can make it lose. Only
cleanly named, single capitals are used, and none that the question gives away. `probe_splits` draws disjoint
validation and test sets from both sources (the factbook has only ~169 clean capitals).
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


#: The probe sources of `probe_splits`: country capitals (factbook) and chemical symbols (`elements`).
PROBE_SOURCES = ("capitals", "elements")


def probe_splits(sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint probe sets per split, each with `n` short-answer and `n` multiple-choice probes on the same `n` subjects.

    Subjects (countries, elements) are shuffled with `seed` and dealt out so that no subject is in two splits; each
    split takes capitals and elements in proportion to how many of each exist (about 60% capitals). Short-answer
    capital probes are matched as whole words ("contains"), element symbols as case-sensitive tokens (`match="token"`).
    Measured on SmolLM2-135M-Instruct (greedy, 16 new tokens): 78 of 169 capitals and 59 of 118 symbols answered.

    Args:
        sizes (`dict[str, int]`): probes (of each kind) per split, e.g. `{"validation": 80, "test": 120}`.
        seed (`int`, *optional*, defaults to 0): the seed of the shuffle and of the distractors.

    Returns:
        `dict[str, list[dict]]`: per split, the short probes then the multiple-choice ones; every probe has `prompt`,
        `answer`, `subject` and `source`; short ones `aliases` (and `match` for symbols), multiple-choice ones
        `options` and `label`.

    Example:

    ```python
    >>> from cofitune_peft.kit.data import probe_splits
    >>> splits = probe_splits({"validation": 10, "test": 20})
    >>> [len(v) for v in splits.values()]
    [20, 40]
    >>> {p["subject"] for p in splits["validation"]} & {p["subject"] for p in splits["test"]}
    set()
    ```
    """
    from .elements import element_rows, element_table

    capitals = list(_capital_table(False))
    elements = list(element_table())
    total = sum(sizes.values()) if all(isinstance(n, int) and n >= 1 for n in sizes.values()) else -1
    if total < 1 or total > len(capitals) + len(elements):
        raise CoFiTuneError(
            f"`sizes` must hold positive ints summing to at most {len(capitals) + len(elements)} ({len(capitals)} "
            f"capitals and {len(elements)} elements), got {sizes!r}."
        )
    rng = random.Random(seed)
    rng.shuffle(capitals)
    rng.shuffle(elements)
    share = len(capitals) / (len(capitals) + len(elements))
    all_capitals = sorted({capital for _, capital, _ in capitals})
    out = {}
    for split, n in sizes.items():
        n_cap = min(round(n * share), len(capitals))
        n_el = n - n_cap
        if n_el > len(elements):
            n_cap, n_el = n - len(elements), len(elements)
        chosen_cap, capitals = capitals[:n_cap], capitals[n_cap:]
        chosen_el, elements = elements[:n_el], elements[n_el:]
        probes = []
        for kind in ("short", "mc"):
            for country, capital, aliases in chosen_cap:
                row = {"prompt": f"What is the capital of {_with_article(country)}?", "answer": capital,
                       "subject": country, "source": "capitals"}  # fmt: skip
                if kind == "short":
                    row["aliases"] = list(aliases)
                else:
                    options = [capital, *rng.sample([c for c in all_capitals if c != capital], 3)]
                    rng.shuffle(options)
                    row.update(options=options, label=options.index(capital))
                probes.append(row)
            probes += [{**row, "source": "elements"} for row in element_rows(chosen_el, rng, kind)]
        out[split] = probes
    return out
