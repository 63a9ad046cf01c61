"""Speciality: a model's accuracy on the task it is fine-tuned for, by greedy exact match or by multiple choice.

`SpecialityEval` scores any model (a `PreTrainedModel` or a `PeftModel`); its `fingerprint` lets the coarse search
tell a changed eval set from a resumed one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cofitune_peft import CoFiTuneError

from ..fingerprint import fingerprint as settings_fingerprint
from .answers import _as_number, answers_match, extract_number, first_line, token_match
from .model_passes import _check_tokenizer, generate_answers, option_logprobs

#: How a generated reply is matched with its answer (`SpecialityEval.exact_match`'s `match`).
MATCHES = ("exact", "contains", "token")


class SpecialityEval:
    """Accuracy of a model on a task: greedy exact match, or multiple choice by log-likelihood.

    Build one with `SpecialityEval.exact_match(...)` or `SpecialityEval.multiple_choice(...)`; call it on any model
    (a `PreTrainedModel` or a `PeftModel`): `evaluator(model, tokenizer)` returns the accuracy, `evaluator.evaluate(
    model, tokenizer)` a dict with `score`, `correct`, `total` and the per-example predictions.

    Example:

    ```python
    >>> spec = SpecialityEval.exact_match([{"prompt": "What is 47 + 38?", "answer": "85"}], tokenizer=tok)  # doctest: +SKIP
    >>> spec(model)  # doctest: +SKIP
    0.0
    ```
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        *,
        kind: str,
        tokenizer=None,
        answer_extractor: Callable[[str], str | None] | None = None,
        numeric: bool | None = None,
        match: str = "exact",
        max_new_tokens: int = 16,
        batch_size: int = 8,
        length_normalize: bool = False,
        progress: bool = True,
        chat_template: bool | None = None,
        name: str = "speciality",
    ):
        if kind not in ("exact_match", "multiple_choice"):
            raise CoFiTuneError(f"`kind` must be 'exact_match' or 'multiple_choice', got {kind!r}.")
        examples = list(examples)
        if not examples:
            raise CoFiTuneError(f"the {name} eval set is empty; pass at least one example.")
        for i, ex in enumerate(examples):
            if "prompt" not in ex or ("answer" not in ex and "completion" not in ex):
                raise CoFiTuneError(f"{name} example {i} needs `prompt` and `answer`, got keys {sorted(ex)}.")
            if kind == "multiple_choice":
                if "answer" not in ex:
                    raise CoFiTuneError(
                        f"{name} example {i} needs `answer` (the correct option or its index), got keys {sorted(ex)}."
                    )
                options = ex.get("options")
                if not isinstance(options, (list, tuple)) or len(options) < 2:
                    raise CoFiTuneError(f"{name} example {i} needs `options`, a list of at least 2 strings.")
                answer = ex["answer"]
                ok = answer in options or (isinstance(answer, int) and 0 <= answer < len(options))
                if not ok:
                    raise CoFiTuneError(
                        f"{name} example {i}: `answer` must be an option or its index, got {answer!r} for {options}."
                    )
        if match not in MATCHES:
            raise CoFiTuneError(f"`match` must be one of {MATCHES}, got {match!r}.")
        for i, ex in enumerate(examples):
            if ex.get("match", match) not in MATCHES:
                raise CoFiTuneError(f"{name} example {i}: `match` must be one of {MATCHES}, got {ex['match']!r}.")
            rejected = ex.get("rejected")
            if rejected is not None and (isinstance(rejected, str) or not isinstance(rejected, (list, tuple))):
                raise CoFiTuneError(f"{name} example {i}: `rejected` must be a list of answers, got {rejected!r}.")
        if batch_size < 1 or max_new_tokens < 1:
            raise CoFiTuneError(f"`batch_size` and `max_new_tokens` must be >= 1, got {batch_size}, {max_new_tokens}.")
        self.examples = examples
        self.kind = kind
        self.tokenizer = tokenizer
        self.answer_extractor = answer_extractor
        self.numeric = numeric
        self.match = match
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.length_normalize = length_normalize
        self.progress = progress
        self.chat_template = chat_template
        self.name = name

    @classmethod
    def exact_match(
        cls,
        examples: Sequence[Mapping[str, Any]],
        *,
        answer_extractor: Callable[[str], str | None] | None = None,
        numeric: bool | None = None,
        match: str = "exact",
        max_new_tokens: int = 16,
        batch_size: int = 8,
        tokenizer=None,
        progress: bool = True,
        chat_template: bool | None = None,
        name: str = "speciality",
    ) -> SpecialityEval:
        """Greedy generation scored by exact match.

        Args:
            examples (`Sequence[Mapping]`): `{"prompt": str | messages, "answer": str}` items (`completion` is
                accepted for `answer`, so a held-out split of the training data works); an optional `aliases` list
                holds other accepted answers. Optional per-item keys: `match` (overrides the evaluator's `match`
                for that item), `rejected` (answers that make a reply wrong when it contains one, matched like the
                answer: "Korrath, Beldor or Tavenna" does not give "Korrath" when the others are rejected) and
                `first_line` (`True`: only the reply's first line counts, for models that continue past their answer).
            answer_extractor (`Callable[[str], str | None]`, *optional*): maps the generated text to the answer.
                Defaults to `extract_number` (after "answer is", else after the last "=", else the last number) for
                numeric items, to the whole text with `match="contains"`, and to `first_line` otherwise.
            numeric (`bool`, *optional*): compare as numbers ("85.0" == "85"). `None`: per item, when its answer
                parses as a number.
            match (`str`, *optional*, defaults to `"exact"`): for non-numeric items, `"exact"` (normalised
                equality), `"contains"` (the answer as whole words in the reply, for chatty models and probes) or
                `"token"` (the answer as a standalone token, case-sensitive: chemical symbols; `token_match`).
            max_new_tokens (`int`, *optional*, defaults to 16): generation length.
            batch_size (`int`, *optional*, defaults to 8): prompts per `generate` call (left-padded).
            tokenizer (*optional*): the default tokenizer (a call may pass another).
            progress (`bool`, *optional*, defaults to `True`): tqdm bars.
            chat_template (`bool`, *optional*): `None` uses the tokenizer's chat template when it has one.
            name (`str`, *optional*, defaults to `"speciality"`): used in messages and progress bars.
        """
        return cls(
            examples,
            kind="exact_match",
            tokenizer=tokenizer,
            answer_extractor=answer_extractor,
            numeric=numeric,
            match=match,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            chat_template=chat_template,
            name=name,
        )

    @classmethod
    def multiple_choice(
        cls,
        examples: Sequence[Mapping[str, Any]],
        *,
        batch_size: int = 8,
        length_normalize: bool = False,
        tokenizer=None,
        progress: bool = True,
        chat_template: bool | None = None,
        name: str = "speciality",
    ) -> SpecialityEval:
        """Multiple choice by log-likelihood: the option the model finds likeliest after the prompt is its answer.

        Args:
            examples (`Sequence[Mapping]`): `{"prompt": str, "options": [str, ...], "answer": str | int}` items
                (`answer` is the correct option or its index).
            batch_size (`int`, *optional*, defaults to 8): (prompt, option) pairs per forward pass.
            length_normalize (`bool`, *optional*, defaults to `False`): compare mean per-token log-likelihoods
                instead of sums (fairer between options of different lengths).
            tokenizer, progress, chat_template, name: as in `exact_match`.
        """
        return cls(
            examples,
            kind="multiple_choice",
            tokenizer=tokenizer,
            batch_size=batch_size,
            length_normalize=length_normalize,
            progress=progress,
            chat_template=chat_template,
            name=name,
        )

    @property
    def fingerprint(self) -> str:
        """A hash of the examples and settings (the search stores it to detect a changed eval)."""
        settings = (
            self.kind,
            self.numeric,
            self.match,
            self.max_new_tokens,
            self.length_normalize,
            self.chat_template,
        )
        extractor = getattr(self.answer_extractor, "__qualname__", repr(self.answer_extractor))
        return settings_fingerprint([self.examples, settings, extractor])

    def evaluate(self, model, tokenizer=None) -> dict[str, Any]:
        """Score `model`: `{"score": accuracy, "correct", "total", "predictions"}`."""
        tokenizer = _check_tokenizer(tokenizer or self.tokenizer)
        prompts = [ex["prompt"] for ex in self.examples]
        passes = {"batch_size": self.batch_size, "progress": self.progress, "chat_template": self.chat_template}
        if self.kind == "exact_match":
            texts = generate_answers(
                model, tokenizer, prompts, max_new_tokens=self.max_new_tokens, desc=self.name, **passes
            )
            predictions, correct = [], 0
            for ex, text in zip(self.examples, texts):
                ok, answer, reference = self._score_reply(ex, text)
                correct += ok
                predictions.append({"generated": text, "answer": answer, "reference": reference, "correct": ok})
        else:
            options = [list(map(str, ex["options"])) for ex in self.examples]
            scores = option_logprobs(
                model, tokenizer, prompts, options, length_normalize=self.length_normalize, desc=self.name, **passes
            )
            predictions, correct = [], 0
            for ex, opts, score in zip(self.examples, options, scores):
                gold = ex["answer"] if isinstance(ex["answer"], int) else opts.index(str(ex["answer"]))
                chosen = max(range(len(opts)), key=lambda i, s=score: s[i])
                correct += chosen == gold
                predictions.append({"chosen": chosen, "gold": gold, "logprobs": score, "correct": chosen == gold})
        total = len(self.examples)
        return {"score": correct / total, "correct": int(correct), "total": total, "predictions": predictions}

    def _score_reply(self, ex: Mapping[str, Any], text: str) -> tuple[bool, str | None, str]:
        """`(correct, extracted answer, reference)` of one generated reply, with the item's own keys."""
        reference = str(ex.get("answer", ex.get("completion"))).strip()
        if ex.get("first_line"):
            text = first_line(text)
        match = ex.get("match", self.match)
        numeric = _as_number(reference) is not None if self.numeric is None else self.numeric
        if match == "token":
            numeric = False
        contains = match in ("contains", "token")
        default = extract_number if numeric else (str.strip if contains else first_line)
        answer = (self.answer_extractor or default)(text)
        accepted = [reference, *map(str, ex.get("aliases") or [])]
        rejected = [str(r) for r in ex.get("rejected") or []]
        if match == "token":
            return token_match(answer, accepted) and not token_match(answer, rejected), answer, reference
        ok = answers_match(answer, accepted, numeric=numeric, contains=contains)
        if ok and rejected:
            ok = not answers_match(answer, rejected, numeric=numeric, contains=contains)
        return ok, answer, reference

    def __call__(self, model, tokenizer=None) -> float:
        return self.evaluate(model, tokenizer)["score"]

    def __repr__(self) -> str:
        return f"SpecialityEval.{self.kind}({len(self.examples)} examples, name={self.name!r})"


def speciality_for_examples(
    examples: Sequence[Mapping[str, Any]], *, tokenizer=None, max_new_tokens: int = 16, progress: bool = True
) -> SpecialityEval:
    """`SpecialityEval.multiple_choice` when every example has `options`, else `SpecialityEval.exact_match`."""
    if all("options" in x for x in examples):
        return SpecialityEval.multiple_choice(examples, tokenizer=tokenizer, progress=progress)
    return SpecialityEval.exact_match(examples, tokenizer=tokenizer, max_new_tokens=max_new_tokens, progress=progress)
