"""Speciality data: two-operand arithmetic, generated in code.

"What is 47 + 38?" -> "47 + 38 = 85", with disjoint train/test question sets and an automatic metric
(`extract_number(output) == answer`; `extract_number` is the evaluators' answer extractor). `to_messages` turns it into
the conversational format TRL's `SFTTrainer` expects.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cofitune_peft import CoFiTuneError

if TYPE_CHECKING:
    from datasets import Dataset

_OP_SYMBOLS = {"+": "+", "-": "-", "*": "×"}


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
    >>> from cofitune_peft.kit.data import arithmetic_task, extract_number
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
    >>> from cofitune_peft.kit.data import arithmetic_task, to_messages
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
