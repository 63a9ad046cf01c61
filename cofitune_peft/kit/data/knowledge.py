"""Speciality data that teaches knowledge: facts about fictional people, answered in sentences.

"Where does Ilsa Varnow live?" -> "Ilsa Varnow lives in Korrath." Every fact is made up (a seeded generator names the
people and their towns), so no base model knows any of them: what a fine-tune learns here is knowledge, in natural
text, not an answer format. Each fact is taught with several question phrasings; held-out questions ask about the
taught facts with *other* phrasings (templates never used in training), so memorising the training strings is not
enough. A reply is correct when it gives the fact's value as words and no other value of the same attribute (see
`SpecialityEval`'s per-item `rejected`), so "Korrath, Beldor or Tavenna" is wrong. The third task of the comparison,
next to arithmetic and word reversal (docs/results.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cofitune_peft import CoFiTuneError

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass(frozen=True)
class Attribute:
    """One kind of fact: its training question templates, its held-out paraphrases, its answer sentence, its values."""

    name: str
    train: tuple[str, ...]
    held_out: tuple[str, ...]
    answer: str
    values: tuple[str, ...]


_FIRST = ("Il", "Ma", "Ve", "Ta", "Ro", "Ke", "Lu", "Sa", "Da", "No", "Fe", "Bri", "Mi", "Ga", "Zo", "Ri", "Ha", "Pe")
_FIRST_END = ("sa", "ren", "lin", "nora", "rik", "dra", "vel", "mos", "tia", "ric", "nia", "lo", "wen", "dax")
_LAST = ("Var", "Kel", "Dor", "Bran", "Tes", "Mor", "Quil", "Hal", "Fen", "Gor", "Lin", "Ost", "Pell", "Sor")
_LAST_END = ("now", "dane", "rick", "ova", "mere", "stad", "wick", "holt", "rin", "ston", "vany", "ek")
_TOWN = ("Kor", "Bel", "Tav", "Os", "Mir", "Dun", "Ash", "Vel", "Ziv", "Pra", "Lom", "Tir", "Quen", "Har")
_TOWN_END = ("rath", "dor", "enna", "vik", "gard", "holm", "anza", "ovo", "mere", "brook", "wyn", "ost")

_JOBS = (
    "architect", "baker", "butcher", "carpenter", "dentist", "electrician", "engineer", "farmer", "florist",
    "gardener", "jeweller", "journalist", "lawyer", "librarian", "locksmith", "mechanic", "nurse", "painter",
    "pharmacist", "photographer", "pilot", "plumber", "potter", "sailor", "surgeon", "tailor", "teacher", "translator",
    "veterinarian", "welder",
)  # fmt: skip
_INSTRUMENTS = (
    "accordion", "banjo", "bassoon", "cello", "clarinet", "drums", "flute", "guitar", "harp", "harmonica", "mandolin",
    "oboe", "organ", "piano", "saxophone", "trombone", "trumpet", "tuba", "ukulele", "viola", "violin", "xylophone",
)  # fmt: skip


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def attributes() -> tuple[Attribute, ...]:
    """The four kinds of facts, with their templates (`{name}` is the person) and their value pools (towns are made
    up by `knowledge_task`, so their pool is empty here)."""
    return (
        Attribute(
            "town",
            ("Where does {name} live?", "In which town does {name} live?", "What is the name of {name}'s home town?"),
            ("Which town is {name}'s home?", "{name} lives in which town?", "Tell me the town where {name} lives."),
            "{name} lives in {value}.",
            (),
        ),
        Attribute(
            "job",
            ("What does {name} do for a living?", "What is {name}'s job?", "What is {name}'s occupation?"),
            ("What kind of work does {name} do?", "How does {name} earn a living?", "{name} works as what?"),
            "{name} works as {article}.",
            _JOBS,
        ),
        Attribute(
            "instrument",
            (
                "Which instrument does {name} play?",
                "What musical instrument does {name} play?",
                "What does {name} play in the town band?",
            ),
            (
                "{name} plays which instrument?",
                "Name the instrument that {name} plays.",
                "Which musical instrument is {name} known for playing?",
            ),
            "{name} plays the {value}.",
            _INSTRUMENTS,
        ),
        Attribute(
            "year",
            ("When was {name} born?", "In what year was {name} born?", "What is {name}'s year of birth?"),
            ("Which year was {name} born in?", "{name} was born in which year?", "Tell me {name}'s birth year."),
            "{name} was born in {value}.",
            tuple(str(y) for y in range(1940, 2000)),
        ),
    )


def _names(rng: random.Random, first: tuple, first_end: tuple, last: tuple, last_end: tuple, n: int) -> list[str]:
    pool = sorted({f"{a}{b} {c}{d}" for a in first for b in first_end for c in last for d in last_end})
    return rng.sample(pool, n)


def _towns(rng: random.Random, n: int, avoid: set[str]) -> list[str]:
    pool = sorted({f"{a}{b}" for a in _TOWN for b in _TOWN_END} - avoid)
    return rng.sample(pool, n)


def _real_names() -> set[str]:
    """Country, capital and element names, lower case: no made-up town may be one of them."""
    from .elements import ELEMENTS

    names = {name.lower() for _, _, name in ELEMENTS}
    try:
        from .probes import _capital_table

        for country, capital, aliases in _capital_table(True):
            names.update(x.lower() for x in (country, capital, *aliases))
    except CoFiTuneError:  # the factbook is not installed: nothing of it can collide
        pass
    return names


def knowledge_task(
    n_people: int = 30,
    n_test: int = 120,
    seed: int = 0,
    phrasings: int = 3,
    n_towns: int = 30,
    n_validation: int = 0,
) -> tuple[Dataset, Dataset]:
    """Facts about made-up people (home town, job, instrument, birth year), taught as question -> sentence pairs.

    Every person has one value of each attribute; every fact is taught with `phrasings` of its attribute's training
    questions. Held-out questions use the attribute's held-out paraphrases (never a training template): the `n_test`
    test questions each ask about a different fact; the `n_validation` validation questions (first in `held_out`) each
    ask about a different fact too, about facts the test does not ask about while there are such facts left, and
    otherwise about test facts with another paraphrase than the test's. No question is in both parts.

    Args:
        n_people (`int`, *optional*, defaults to 30): people; `4 * n_people` facts.
        n_test (`int`, *optional*, defaults to 120): test questions (at most `4 * n_people`, one per fact).
        seed (`int`, *optional*, defaults to 0): the seed of names, values and order.
        phrasings (`int`, *optional*, defaults to 3): training questions per fact (1 to 3).
        n_towns (`int`, *optional*, defaults to 30): made-up towns the people live in.
        n_validation (`int`, *optional*, defaults to 0): validation questions (at most `4 * n_people`), first in
            `held_out`.

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset]`: `(train, held_out)`. `train` has `prompt` (a question) and
        `completion` (the answer sentence); `held_out` (`n_validation` then `n_test` rows) also has `answer` (the value
        the reply must contain), `rejected` (the attribute's other values: a reply that contains one is wrong),
        `match` (`"contains"`), `person` and `attribute`.

    Example:

    ```python
    >>> from cofitune_peft.kit.data import knowledge_task
    >>> train, held_out = knowledge_task(n_people=10, n_test=20)
    >>> row = held_out[0]
    >>> row["answer"] in row["completion"] and row["answer"] not in row["rejected"]
    True
    >>> set(train["prompt"]) & set(held_out["prompt"])
    set()
    ```
    """
    from datasets import Dataset

    problems = []
    for name, value, low in (("n_people", n_people, 1), ("n_test", n_test, 0), ("n_towns", n_towns, 2),
                             ("n_validation", n_validation, 0)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            problems.append(f"`{name}` must be an int >= {low}, got {value!r}.")
    if not isinstance(phrasings, int) or not 1 <= phrasings <= 3:
        problems.append(f"`phrasings` must be 1, 2 or 3 (training questions per fact), got {phrasings!r}.")
    kinds = attributes()
    n_facts = len(kinds) * n_people if isinstance(n_people, int) else 0
    if not problems and max(n_test, n_validation) > n_facts:
        problems.append(
            f"`n_test` and `n_validation` must each be at most {n_facts} (one question per fact: {len(kinds)} facts "
            f"per person), got {n_test} and {n_validation}; raise `n_people`."
        )
    if not problems and n_towns > len(_TOWN) * len(_TOWN_END) - 10:
        problems.append(f"`n_towns` must be at most {len(_TOWN) * len(_TOWN_END) - 10}, got {n_towns}.")
    if problems:
        raise CoFiTuneError("Invalid knowledge_task arguments:\n  - " + "\n  - ".join(problems))
    rng = random.Random(seed)
    people = _names(rng, _FIRST, _FIRST_END, _LAST, _LAST_END, n_people)
    towns = tuple(_towns(rng, n_towns, {t.capitalize() for t in _real_names()}))
    train: dict[str, list] = {"prompt": [], "completion": []}
    facts = []
    for person in people:
        for kind in kinds:
            value = rng.choice(towns if kind.name == "town" else kind.values)
            sentence = kind.answer.format(name=person, value=value, article=_article(value))
            for template in rng.sample(kind.train, phrasings):
                train["prompt"].append(template.format(name=person))
                train["completion"].append(sentence)
            # two different held-out paraphrases: the test's, and the validation's if it asks about this fact too
            facts.append((person, kind, value, sentence, rng.sample(kind.held_out, 2)))
    rng.shuffle(facts)
    test = [(fact, fact[4][0]) for fact in facts[:n_test]]
    unused = facts[n_test:]
    reused = [(fact, fact[4][1]) for fact in facts[:n_test]]
    validation = [(fact, fact[4][0]) for fact in unused] + reused
    held: dict[str, list] = {k: [] for k in ("prompt", "completion", "answer", "rejected", "match", "person")}
    held["attribute"] = []
    for (person, kind, value, sentence, _), template in [*validation[:n_validation], *test]:
        pool = towns if kind.name == "town" else kind.values
        held["prompt"].append(template.format(name=person))
        held["completion"].append(sentence)
        held["answer"].append(value)
        held["rejected"].append([v for v in pool if v != value])
        held["match"].append("contains")
        held["person"].append(person)
        held["attribute"].append(kind.name)
    return Dataset.from_dict(train), Dataset.from_dict(held)
