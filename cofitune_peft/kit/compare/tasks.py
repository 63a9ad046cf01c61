"""The kit's offline comparison tasks as evaluation splits, and a model loader that loads once.

Three speciality tasks, each with the same versatility measure: `"arithmetic"` (two-operand arithmetic answered with
the bare number, "What is 47 + 38?" -> "85": the answer format that makes fine-tuning forget, docs/results.md),
`"words"` (word-order reversal, "Reverse the order of these words: apple river stone" -> "stone river apple") and
`"knowledge"` (facts about made-up people answered in sentences, "Where does Ilsa Varnow live?" -> "Ilsa Varnow lives
in Korrath.", asked on held-out paraphrases: learning knowledge, not a format). Held-out questions are split into
validation and test (for the knowledge task: the test asks about every fact once; validation about 80 of them with
other paraphrases, so no question is in both); versatility probes (country capitals and chemical
symbols, generated short answers and 4-way multiple choice) are split by subject, general prose by document;
importance and CorDA read the separate `importance` split of `general_texts`. For a model without a chat template
every prompt takes the plain "Question: ...\nAnswer:" form (`plain_format`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from typing import Any

from cofitune_peft import CoFiTuneError
from cofitune_peft.utils import write_json_atomic

from ..fingerprint import fingerprint
from .runner import EvalSplit

TASKS = ("arithmetic", "words", "knowledge")
#: People of the knowledge task (4 facts each): 120 facts, one test question each; validation asks about 80 of them
#: with other paraphrases (calibrated in docs/results.md, "A knowledge task that forgets").
KNOWLEDGE_PEOPLE = 30


def task_data(task: str, n_train: int, n_test: int, n_validation: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """`(train, held_out, SpecialityEval.exact_match scoring arguments)` of one of `TASKS`: `n_test` held-out
    questions, the first `n_validation` of them for validation (the knowledge task teaches every fact of
    `max(KNOWLEDGE_PEOPLE, (n_test - n_validation) / 4)` people, whatever `n_train`; see `knowledge_task`)."""
    from ..data import arithmetic_task, knowledge_task, word_reversal_task
    from ..evaluation import extract_number

    if task == "arithmetic":
        train, held_out = arithmetic_task(n_train=n_train, n_test=n_test, completion_style="answer")
        return train, held_out, {"answer_extractor": extract_number, "numeric": True}
    if task == "words":
        train, held_out = word_reversal_task(n_train=n_train, n_test=n_test)
        return train, held_out, {"numeric": False}
    if task == "knowledge":
        tested = n_test - n_validation
        people = max(KNOWLEDGE_PEOPLE, math.ceil(tested / 4), math.ceil(n_validation / 4))
        train, held_out = knowledge_task(n_people=people, n_test=tested, n_validation=n_validation)
        return train, held_out, {"numeric": False, "match": "contains"}
    raise CoFiTuneError(f"`task` must be one of {TASKS}, got {task!r}.")


def plain_format(item: dict) -> dict:
    """An example or probe in the plain prompt format of a model without a chat template: "Question: <prompt>\nAnswer:"
    with the completion after a space; a generated reply is scored on its first line (`first_line`), since a base model
    goes on with the next question."""
    out = dict(item)
    out["prompt"] = f"Question: {item['prompt']}\nAnswer:"
    if "completion" in out:
        out["completion"] = " " + str(out["completion"]).lstrip()
    if "options" not in out:
        out["first_line"] = True
    return out


def task_splits(
    task: str,
    tokenizer,
    *,
    n_train: int = 2000,
    n_eval: int = 100,
    n_test: int | None = None,
    n_general: int = 24,
    importance_samples: int = 64,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> tuple[list[dict], dict[str, EvalSplit], list[str]]:
    """`(train, {"validation": EvalSplit, "test": EvalSplit}, general texts for importance)` of one of `TASKS`.

    Validation has `n_eval` questions, test `n_test` (default: `n_eval`); each split has as many short-answer and as
    many multiple-choice probes as questions (`probe_splits`: capitals and chemical symbols, disjoint subjects) and
    `n_general` general texts (disjoint documents). Without a chat template, everything is in `plain_format`.
    """
    from ..data import general_texts, probe_splits
    from ..evaluation import SpecialityEval, VersatilityEval
    from ..training.encoding import has_chat_template

    n_test = n_eval if n_test is None else n_test
    train, held_out, scoring = task_data(task, n_train, n_eval + n_test, n_validation=n_eval)
    fmt = (lambda x: dict(x)) if has_chat_template(tokenizer) else plain_format
    held_out = [fmt(dict(x)) for x in held_out]
    probes = probe_splits({"validation": n_eval, "test": n_test})
    docs = general_texts(n=None, split="eval")
    documents = sorted(set(docs["document"]))
    val_docs = set(documents[::2])
    splits = {}
    for name, questions, in_val in (("validation", held_out[:n_eval], True), ("test", held_out[n_eval:], False)):
        texts = [t for t, d in zip(docs["text"], docs["document"]) if (d in val_docs) == in_val][:n_general]
        spec = SpecialityEval.exact_match(
            questions, max_new_tokens=max_new_tokens, tokenizer=tokenizer, progress=progress,
            name=f"{name} {task}", batch_size=16, **scoring,
        )  # fmt: skip
        vers = VersatilityEval.default(texts, [fmt(p) for p in probes[name]], tokenizer=tokenizer,
                                       max_new_tokens=max_new_tokens, progress=progress,
                                       generation_batch_size=16)  # fmt: skip
        splits[name] = EvalSplit(spec, vers)
    general = list(general_texts(n=importance_samples, split="importance")["text"])
    return [fmt(dict(x)) for x in train], splits, general


def task_replay(
    load: Callable[[], Any],
    tokenizer,
    splits: dict[str, EvalSplit],
    path: str,
    *,
    n: int = 128,
    progress: bool = True,
) -> list[dict]:
    """The replay examples of a comparison (`replay_pool`: the base model's answers to general instructions, none
    stating a probed fact or naming a person of the task), generated once and kept as JSON at `path`.

    A saved file is reused when it was made from the same instructions, model and exclusions; otherwise it is remade.
    """
    from ..data.replay import replay_instructions, replay_pool
    from ..training.encoding import has_chat_template

    exclude = [p for split in splits.values() for p in getattr(split.versatility, "probes", [])]
    names = sorted(
        {x["person"] for s in splits.values() for x in getattr(s.speciality, "examples", []) if "person" in x}
    )
    model = load()
    model = model[0] if isinstance(model, tuple) else model
    plain = not has_chat_template(tokenizer)
    key = fingerprint([replay_instructions(n), model.config.to_dict(), exclude, names, plain])
    if os.path.isfile(path):
        with open(path) as fh:
            saved = json.load(fh)
        if saved.get("key") == key and isinstance(saved.get("examples"), list):
            return saved["examples"]
    examples = replay_pool(model, tokenizer, n=n, exclude=exclude, names=names,
                           wrap=plain_format if plain else None, progress=progress)  # fmt: skip
    if not examples:
        raise CoFiTuneError("no replay answer survived the filters (every one stated a probed fact); raise `n`.")
    write_json_atomic(path, {"key": key, "examples": examples})
    return examples


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
