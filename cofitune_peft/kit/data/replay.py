"""Replay data: general instructions answered by the base model itself, to mix into a fine-tuning set.

The practitioners' baseline against forgetting is to keep some general data in the training mix. No instruction data
set ships offline here, so the replay examples are the base model's own greedy answers to general instructions from a
pool of its own (everyday topics x request templates): training on them asks the model to keep answering general
requests as it did before, which is what replay is for, and they cannot teach it anything new. The pool shares nothing
with the evaluations: no question is about a country, a capital or an element, and `replay_pool` drops any answer that
states a probed fact (a probe's subject together with its answer) or names a person of the knowledge task.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from cofitune_peft import CoFiTuneError

from ..evaluation.answers import answers_match, token_match

_TOPICS = """
    baking bread; learning to swim; saving money; planting tomatoes; writing a letter; training a puppy;
    cleaning a kitchen; riding a bicycle; reading before bed; making soup; packing for a trip; learning a new
    language; keeping a diary; drinking enough water; taking a short walk; organising a desk; repairing a flat tyre;
    brewing tea; painting a fence; caring for houseplants; cooking rice; sleeping well; stretching after exercise;
    planning a birthday party; folding laundry; studying for an exam; knitting a scarf; building a birdhouse;
    washing a car; baking cookies; starting a vegetable garden; choosing running shoes; making a budget; writing
    a poem; playing chess; learning to juggle; sorting recycling; hanging a picture; setting up a tent; making
    pancakes; walking a dog; sharpening a pencil; taking good photos; decorating a room; feeding birds in winter;
    making a paper plane; keeping a fish tank clean; memorising a speech; being on time; making new friends;
    brushing your teeth; cooking pasta; learning to draw; fixing a squeaky door; carrying groceries; making a
    sandwich; listening carefully; writing a shopping list; taking notes in class; tidying a garage
"""
TOPICS = tuple(t.strip() for t in _TOPICS.replace("\n", " ").split(";") if t.strip())
TEMPLATES = (
    "Give me two tips for {topic}.",
    "Explain {topic} to a child in two sentences.",
    "What are the benefits of {topic}?",
    "Write a short paragraph about {topic}.",
)
# a sentence ends at . ! or ? after a letter or a closing mark, not after a list number ("1.")
_SENTENCE_END = re.compile(r"(?<=[A-Za-z)\"'])[.!?](?=\s|$)")


def replay_instructions(n: int = 128, seed: int = 0) -> list[str]:
    """`n` distinct general instructions (`TEMPLATES` x `TOPICS`, seeded sample).

    Example:

    ```python
    >>> from cofitune_peft.kit.data.replay import replay_instructions
    >>> replay_instructions(2, seed=0) == replay_instructions(2, seed=0)
    True
    ```
    """
    pool = [t.format(topic=topic) for topic in TOPICS for t in TEMPLATES]
    if not isinstance(n, int) or not 1 <= n <= len(pool):
        raise CoFiTuneError(f"`n` must be an int in [1, {len(pool)}] (replay instructions), got {n!r}.")
    return random.Random(seed).sample(pool, n)


def complete_sentences(text: str) -> str | None:
    """`text` cut after its last complete sentence (a generated answer stops mid-sentence), or None without one."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()].strip() if ends else None


def states_probed_fact(text: str, probes: Sequence[Mapping[str, Any]]) -> bool:
    """Whether `text` names a probe's subject together with its answer (e.g. "France" and "Paris")."""
    for probe in probes:
        subject = probe.get("subject")
        if not subject or not answers_match(text, str(subject), contains=True):
            continue
        answers = [str(probe["answer"]), *map(str, probe.get("aliases") or [])]
        found = (
            token_match(text, answers)
            if probe.get("match") == "token"
            else answers_match(text, answers, contains=True)
        )
        if found:
            return True
    return False


def replay_pool(
    model,
    tokenizer,
    *,
    n: int = 128,
    seed: int = 0,
    max_new_tokens: int = 48,
    exclude: Sequence[Mapping[str, Any]] = (),
    names: Sequence[str] = (),
    wrap=None,
    progress: bool = True,
) -> list[dict[str, str]]:
    """The base model's own answers to `n` general instructions, as `prompt` / `completion` training examples.

    Each answer is greedy, cut after its last complete sentence (answers without one are dropped), and dropped when it
    states a fact that `exclude` probes (`states_probed_fact`) or names one of `names` (the knowledge task's people).

    Args:
        model: the base model (answers are generated from it as it is).
        tokenizer: its tokenizer (its chat template, if any, renders the instructions).
        n (`int`, *optional*, defaults to 128): instructions asked.
        seed (`int`, *optional*, defaults to 0): which instructions.
        max_new_tokens (`int`, *optional*, defaults to 48): answer length before the cut.
        exclude (`Sequence[Mapping]`): probes (`subject`, `answer`) whose facts replay must not contain.
        names (`Sequence[str]`): names that must not appear in an answer.
        wrap (`Callable[[dict], dict]`, *optional*): turns a `{"prompt", "completion"}` example into the model's prompt
            format (e.g. plain "Question: ...\\nAnswer:" for a model without a chat template); the answer is then
            generated from the wrapped prompt and cut at its first line.
        progress (`bool`, *optional*, defaults to `True`): a tqdm bar.

    Returns:
        `list[dict]`: `{"prompt", "completion"}` examples, in instruction order.
    """
    from ..evaluation import generate_answers

    instructions = replay_instructions(n, seed)
    items = [{"prompt": text, "completion": ""} for text in instructions]
    if wrap is not None:
        items = [wrap(item) for item in items]
    replies = generate_answers(
        model, tokenizer, [x["prompt"] for x in items], max_new_tokens=max_new_tokens, progress=progress,
        desc="replay answers",
    )  # fmt: skip
    lowered = [name.lower() for name in names]
    out = []
    for item, reply in zip(items, replies):
        if wrap is not None:
            reply = reply.strip().splitlines()[0] if reply.strip() else ""
        answer = complete_sentences(reply)
        if not answer or states_probed_fact(answer, exclude) or any(name in answer.lower() for name in lowered):
            continue
        prefix = item["completion"]  # the plain format's leading space
        out.append({"prompt": item["prompt"], "completion": prefix + answer})
    return out
