"""The kit's offline comparison tasks as evaluation splits, and a model loader that loads once.

Two speciality tasks, each with the same versatility measure: `"arithmetic"` (two-operand arithmetic answered with the
bare number, "What is 47 + 38?" -> "85": the answer format that makes fine-tuning forget, docs/results.md) and
`"words"` (word-order reversal, "Reverse the order of these words: apple river stone" -> "stone river apple"). Held-out
questions are split in half (validation, test); country-capital probes (generated short answers and 4-way multiple
choice) are split by country, general prose by document; importance and CorDA read the separate `importance` split of
`general_texts`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from cofitune_peft import CoFiTuneError

from .runner import EvalSplit

TASKS = ("arithmetic", "words")


def task_data(task: str, n_train: int, n_test: int) -> tuple[Any, Any, dict[str, Any]]:
    """`(train, held_out, SpecialityEval.exact_match scoring arguments)` of one of `TASKS`."""
    from ..data import arithmetic_task, word_reversal_task
    from ..evaluation import extract_number

    if task == "arithmetic":
        train, held_out = arithmetic_task(n_train=n_train, n_test=n_test, completion_style="answer")
        return train, held_out, {"answer_extractor": extract_number, "numeric": True}
    if task == "words":
        train, held_out = word_reversal_task(n_train=n_train, n_test=n_test)
        return train, held_out, {"numeric": False}
    raise CoFiTuneError(f"`task` must be one of {TASKS}, got {task!r}.")


def task_splits(
    task: str,
    tokenizer,
    *,
    n_train: int = 2000,
    n_eval: int = 100,
    n_general: int = 24,
    importance_samples: int = 64,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> tuple[list[dict], dict[str, EvalSplit], list[str]]:
    """`(train, {"validation": EvalSplit, "test": EvalSplit}, general texts for importance)` of one of `TASKS`.

    Each split has `n_eval` questions, up to `min(n_eval, 84)` short-answer and as many multiple-choice capital probes
    (disjoint countries) and `n_general` general texts (disjoint documents).
    """
    from ..data import capital_probes, general_texts
    from ..evaluation import SpecialityEval, VersatilityEval

    train, held_out, scoring = task_data(task, n_train, 2 * n_eval)
    held_out = [dict(x) for x in held_out]
    n_probes = min(n_eval, 84)  # the factbook has ~169 countries with one clean capital: half per split at most
    short = [dict(x) for x in capital_probes(2 * n_probes, kind="short")]
    mc = [dict(x) for x in capital_probes(2 * n_probes, kind="mc")]
    val_countries = {x["country"] for x in short[:n_probes]}
    docs = general_texts(n=None, split="eval")
    documents = sorted(set(docs["document"]))
    val_docs = set(documents[::2])
    splits = {}
    for name, questions, in_val in (("validation", held_out[:n_eval], True), ("test", held_out[n_eval:], False)):
        probes = [p for p in short + mc if (p["country"] in val_countries) == in_val]
        texts = [t for t, d in zip(docs["text"], docs["document"]) if (d in val_docs) == in_val][:n_general]
        spec = SpecialityEval.exact_match(
            questions, max_new_tokens=max_new_tokens, tokenizer=tokenizer, progress=progress,
            name=f"{name} {task}", **scoring,
        )  # fmt: skip
        vers = VersatilityEval.default(texts, probes, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                                       progress=progress)  # fmt: skip
        splits[name] = EvalSplit(spec, vers)
    general = list(general_texts(n=importance_samples, split="importance")["text"])
    return [dict(x) for x in train], splits, general


def model_loader(name: str, base_model_id: str | None = None) -> tuple[Callable[[], Any], Any]:
    """`(load, tokenizer)`: `load()` returns a fresh copy of the model `name` (what `cofitune --model` takes: "smollm2",
    a local folder or a Hub id; `loading.load_model_for_command`), read from disk once (a GGUF takes ~20 s to load).
    `base_model_id` is the Hub id its adapters record (`--base-model-id`)."""
    from ..loading import load_model_for_command

    model, tokenizer = load_model_for_command(name, base_model_id=base_model_id)
    model.eval()

    def load():
        return copy.deepcopy(model)

    return load, tokenizer
