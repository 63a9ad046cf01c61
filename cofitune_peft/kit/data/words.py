"""Speciality data whose answers are words: reverse the order of a few words, generated in code.

"Reverse the order of these words: apple river stone" -> "stone river apple". The second task of the comparison,
next to arithmetic: its answers are short sentences of words, not numbers, so that a conclusion about forgetting is
not one answer format's accident. SmolLM2-135M-Instruct gets none right (it lists, sorts or spells the words: 0/16 at
24 new tokens, seed 0), and the rule is learnable from examples, so held-out questions measure what fine-tuning taught.
Scored by exact match after `normalize_answer` (case, punctuation and articles ignored) on the first line of the reply.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from cofitune_peft import CoFiTuneError

if TYPE_CHECKING:
    from datasets import Dataset

_NOUNS = """
    apple river stone cloud tiger window garden candle mirror pencil rocket forest bottle castle dragon jacket ladder
    magnet needle orange pillow rabbit saddle tunnel violin wallet yogurt anchor basket cactus bridge button camera
    carpet cherry circle coffee cookie copper cotton desert doctor dollar engine farmer feather finger flower guitar
    hammer helmet island kettle kitten lemon letter lizard market meadow monkey motor museum nephew ocean office
    onion oyster palace parrot peanut pepper piano pickle pirate planet pocket potato pumpkin puzzle queen radio
    ribbon saucer shadow silver singer sister spider spoon squirrel statue sugar summer sweater table teacher temple
    ticket tomato towel tower trumpet turtle valley wagon walnut water whale winter wizard zebra badger beacon blanket
    bucket butter cabin canyon carrot cereal cheese chimney cobra comet compass crayon dancer dentist diamond dinner
    donkey eagle falcon fence fiddle fountain giraffe glove goose harbor honey horse jungle kayak lantern
    leopard lobster marble mitten moose muffin napkin noodle oven paddle panda parade pebble pelican penguin pigeon
    plum poem pony prism quilt raccoon raven robot salmon sandal scarf shovel sled snail sofa sparrow
    stable storm sunset swan tablet tent thunder toast tractor trolley tulip umbrella vase village volcano walrus
    wheel whistle willow wolf yacht zipper
"""
#: Common concrete nouns, one word each (no articles: `normalize_answer` drops "a", "an", "the").
WORDS = tuple(_NOUNS.split())


def word_reversal_task(
    n_train: int = 2000, n_test: int = 200, seed: int = 0, min_words: int = 3, max_words: int = 5
) -> tuple[Dataset, Dataset]:
    """Reverse the order of `min_words`..`max_words` distinct words: a speciality with word answers.

    Train and test questions are drawn without repetition from one seeded stream, so no question is in both; the test
    set depends only on `seed`, `n_test`, `min_words` and `max_words`.

    Args:
        n_train (`int`, *optional*, defaults to `2000`): training questions.
        n_test (`int`, *optional*, defaults to `200`): test questions.
        seed (`int`, *optional*, defaults to `0`): the seed; the same seed gives the same data sets.
        min_words (`int`, *optional*, defaults to `3`): fewest words per question (at least 2).
        max_words (`int`, *optional*, defaults to `5`): most words per question (at most 8).

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset]`: `(train, test)` with string columns `prompt`, `completion` and
        `answer` (the completion: the words in reverse order, separated by spaces).

    Example:

    ```python
    >>> from cofitune_peft.kit.data import word_reversal_task
    >>> train, test = word_reversal_task(n_train=50, n_test=10)
    >>> row = test[0]
    >>> row["prompt"].split(": ")[1].split()[::-1] == row["answer"].split()
    True
    >>> set(train["prompt"]) & set(test["prompt"])
    set()
    ```
    """
    from datasets import Dataset

    problems = []
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"`{name}` must be a non-negative int, got {value!r}.")
    if not (isinstance(min_words, int) and isinstance(max_words, int) and 2 <= min_words <= max_words <= 8):
        problems.append(
            f"`min_words` and `max_words` need 2 <= min_words <= max_words <= 8, got {min_words}, {max_words}."
        )
    if problems:
        raise CoFiTuneError("Invalid word_reversal_task arguments:\n  - " + "\n  - ".join(problems))
    vocabulary = sorted(set(WORDS))
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()

    def draw(n: int) -> Dataset:
        rows: dict[str, list[str]] = {"prompt": [], "completion": [], "answer": []}
        while len(rows["prompt"]) < n:
            words = tuple(rng.sample(vocabulary, rng.randint(min_words, max_words)))
            if words in seen:
                continue
            seen.add(words)
            answer = " ".join(reversed(words))
            rows["prompt"].append(f"Reverse the order of these words: {' '.join(words)}")
            rows["completion"].append(answer)
            rows["answer"].append(answer)
        return Dataset.from_dict(rows)

    test = draw(n_test)
    train = draw(n_train)
    return train, test
