"""Speciality and versatility scorers, and the Spec. / Vers. / Uni. scores of CoFiTune (arXiv 2404.10306).

The paper measures a fine-tuned model on its domain task ("speciality") and on general abilities ("versatility"),
and reports both relative to reference models. The formulas, hand-checkable:

- `Spec. = (S_tuned - S_base) / (S_full - S_base)`: the tuned model's speciality gain as a fraction of full
  fine-tuning's gain (1.0 = as much as full fine-tuning, 0.0 = no gain over the base model).
- `Vers. = V_tuned / V_base`: the tuned model's versatility relative to the base model (1.0 = none lost).
- `Uni. = w * Spec. + (1 - w) * Vers.`, `w = 0.5` by default (the project reports the mean).

Division by zero raises `CoFiTuneError`: `Spec.` is undefined when full fine-tuning did not move the speciality
score, `Vers.` when the base model's versatility is zero.

`VersatilityEval` turns several measures into one number that is 1.0 for the base model by construction (see its
docstring): probe accuracies relative to the base model's, `exp(-(CE_tuned - CE_base))` (the base/tuned perplexity
ratio on general text, PEFT's "forgetting" metric as a retention) and `exp(-KL(base || tuned))` per token.

Exact match is implemented here, not loaded with `evaluate.load("exact_match")`: that metric is a script fetched from
the Hugging Face Hub on first use, which fails offline (checked with evaluate 0.4.6), and its normalisation options
do not cover numeric answers ("85.0" == "85").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import unicodedata
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import extract_number
from .errors import CoFiTuneError
from .training import IGNORE_INDEX, collate, has_chat_template, pad_id_of, render_prompt

logger = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s.-]|(?<!\d)\.|\.(?!\d)")


# ------------------------------------------------------------------ scores


def speciality_score(tuned: float, base: float, full: float) -> float:
    """`Spec. = (tuned - base) / (full - base)`: speciality gain relative to full fine-tuning's gain.

    Args:
        tuned (`float`): speciality of the tuned model (e.g. exact-match accuracy).
        base (`float`): speciality of the base model.
        full (`float`): speciality of the fully fine-tuned reference.

    Raises:
        `CoFiTuneError`: when `full == base` (full fine-tuning gained nothing, so there is no gain to compare with).

    Example:

    ```python
    >>> speciality_score(tuned=0.5, base=0.1, full=0.9)
    0.5
    ```
    """
    gain = full - base
    if abs(gain) < 1e-12:
        raise CoFiTuneError(
            f"Spec. is undefined: full fine-tuning did not change the speciality score (base {base:g}, full {full:g}); "
            "train the reference longer or at a higher learning rate, or use a harder speciality eval."
        )
    return (tuned - base) / gain


def versatility_score(tuned: float, base: float) -> float:
    """`Vers. = tuned / base`: versatility of the tuned model relative to the base model.

    Raises:
        `CoFiTuneError`: when `base <= 0` (no versatility to keep a fraction of).

    Example:

    ```python
    >>> versatility_score(tuned=0.6, base=0.8)
    0.75
    ```
    """
    if not base > 0:
        raise CoFiTuneError(
            f"Vers. is undefined: the base model's versatility is {base:g}, it must be > 0; use probes the base model "
            "partly solves, or the label-free measures of `VersatilityEval`."
        )
    return tuned / base


def unified_score(spec: float, vers: float, weight: float = 0.5) -> float:
    """`Uni. = weight * spec + (1 - weight) * vers`.

    Example:

    ```python
    >>> unified_score(0.8, 0.9)
    0.85
    ```
    """
    if not 0.0 <= weight <= 1.0:
        raise CoFiTuneError(f"`weight` must lie in [0, 1] (the weight of Spec. in Uni.), got {weight!r}.")
    return weight * spec + (1.0 - weight) * vers


# ------------------------------------------------------------------ answer matching


def first_line(text: str) -> str:
    """The first non-empty line of `text`, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def normalize_answer(text: str) -> str:
    """Lower case, no accents, no articles, no punctuation (decimal points kept), single spaces."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = _ARTICLES.sub(" ", text.lower())
    return " ".join(_PUNCT.sub(" ", text).split())


def _as_number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(str(text).strip().replace(",", ""))
    except ValueError:
        return None


def answers_match(
    prediction: str | None, reference: str | Sequence[str], numeric: bool = False, contains: bool = False
) -> bool:
    """Whether `prediction` gives `reference` (or one of several accepted answers).

    Numeric equality (`1e-6` relative) when `numeric`; otherwise, after `normalize_answer`, equality, or with
    `contains` the reference as whole words anywhere in the prediction ("The capital is Paris." gives "Paris").
    """
    if prediction is None:
        return False
    references = [reference] if isinstance(reference, str) else list(reference)
    if numeric:
        a = _as_number(prediction)
        return a is not None and any(
            (b := _as_number(r)) is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for r in references
        )
    got = normalize_answer(prediction)
    wanted = [normalize_answer(str(r)) for r in references]
    if contains:
        return any(w and f" {w} " in f" {got} " for w in wanted)
    return got in wanted


# ------------------------------------------------------------------ model passes


def _prompt_ids(tokenizer, prompt, chat_template: bool | None) -> list[int]:
    use_template = has_chat_template(tokenizer) if chat_template is None else chat_template
    text = render_prompt(tokenizer, prompt, chat_template=use_template)
    return tokenizer(text, add_special_tokens=not use_template)["input_ids"]


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_tokenizer(tokenizer):
    if tokenizer is None:
        raise CoFiTuneError("a `tokenizer` is needed: pass it to the evaluator or to the call.")
    return tokenizer


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    progress: bool = True,
    chat_template: bool | None = None,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers to `prompts`, batched with left padding; the decoded new text of each."""
    was_training = model.training
    model.eval()
    device, pad = _device_of(model), pad_id_of(tokenizer)
    out: list[str] = []
    encoded = [_prompt_ids(tokenizer, p, chat_template) for p in prompts]
    try:
        for start in tqdm(range(0, len(encoded), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = [(ids, ids) for ids in encoded[start : start + batch_size]]
            batch = collate(chunk, pad, left=True)
            generated = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            new = generated[:, batch["input_ids"].shape[1] :]  # [batch, new tokens]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def option_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    options: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    length_normalize: bool = False,
    progress: bool = True,
    chat_template: bool | None = None,
    desc: str = "options",
) -> list[list[float]]:
    """Log-likelihood of each option as the continuation of its prompt (summed, or per token if `length_normalize`).

    Without a chat template a space separates prompt and option unless either side already has one.
    """
    use_template = has_chat_template(tokenizer) if chat_template is None else chat_template
    was_training = model.training
    model.eval()
    device, pad = _device_of(model), pad_id_of(tokenizer)
    pairs: list[tuple[list[int], list[int]]] = []
    for prompt, opts in zip(prompts, options):
        prompt_ids = _prompt_ids(tokenizer, prompt, use_template)
        prompt_text = prompt if isinstance(prompt, str) else ""
        for option in opts:
            text = str(option)
            if not use_template and prompt_text and not prompt_text[-1].isspace() and not text[:1].isspace():
                text = " " + text
            option_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            pairs.append((prompt_ids + option_ids, [IGNORE_INDEX] * len(prompt_ids) + option_ids))
    scores: list[float] = []
    try:
        for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, leave=False):
            batch = collate(pairs[start : start + batch_size], pad)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [batch, time - 1, vocab]
            labels = batch["labels"][:, 1:].to(device)  # [batch, time - 1]
            keep = labels != IGNORE_INDEX
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep  # [batch, time - 1]
            total = picked.sum(-1)
            if length_normalize:
                total = total / keep.sum(-1).clamp(min=1)
            scores.extend(total.tolist())
    finally:
        model.train(was_training)
    out, i = [], 0
    for opts in options:
        out.append(scores[i : i + len(opts)])
        i += len(opts)
    return out


def _fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ speciality


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
                options = ex.get("options")
                if not isinstance(options, (list, tuple)) or len(options) < 2:
                    raise CoFiTuneError(f"{name} example {i} needs `options`, a list of at least 2 strings.")
                answer = ex["answer"]
                ok = answer in options or (isinstance(answer, int) and 0 <= answer < len(options))
                if not ok:
                    raise CoFiTuneError(
                        f"{name} example {i}: `answer` must be an option or its index, got {answer!r} for {options}."
                    )
        if match not in ("exact", "contains"):
            raise CoFiTuneError(f"`match` must be 'exact' or 'contains', got {match!r}.")
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
                holds other accepted answers.
            answer_extractor (`Callable[[str], str | None]`, *optional*): maps the generated text to the answer.
                Defaults to `data.extract_number` (after "answer is", else after the last "=", else the last number) for numeric items, to the whole
                text with `match="contains"`, and to `first_line` otherwise.
            numeric (`bool`, *optional*): compare as numbers ("85.0" == "85"). `None`: per item, when its answer
                parses as a number.
            match (`str`, *optional*, defaults to `"exact"`): for non-numeric items, `"exact"` (normalised
                equality) or `"contains"` (the answer as whole words in the reply, for chatty models and probes).
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
        return _fingerprint([self.examples, settings, extractor])

    def evaluate(self, model, tokenizer=None) -> dict[str, Any]:
        """Score `model`: `{"score": accuracy, "correct", "total", "predictions"}`."""
        tokenizer = _check_tokenizer(tokenizer or self.tokenizer)
        prompts = [ex["prompt"] for ex in self.examples]
        if self.kind == "exact_match":
            texts = generate_answers(
                model,
                tokenizer,
                prompts,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
                progress=self.progress,
                chat_template=self.chat_template,
                desc=self.name,
            )
            predictions, correct = [], 0
            for ex, text in zip(self.examples, texts):
                reference = str(ex.get("answer", ex.get("completion"))).strip()
                numeric = _as_number(reference) is not None if self.numeric is None else self.numeric
                contains = self.match == "contains"
                default = extract_number if numeric else (str.strip if contains else first_line)
                answer = (self.answer_extractor or default)(text)
                accepted = [reference, *map(str, ex.get("aliases") or [])]
                ok = answers_match(answer, accepted, numeric=numeric, contains=contains)
                correct += ok
                predictions.append({"generated": text, "answer": answer, "reference": reference, "correct": ok})
        else:
            options = [list(map(str, ex["options"])) for ex in self.examples]
            scores = option_logprobs(
                model,
                tokenizer,
                prompts,
                options,
                batch_size=self.batch_size,
                length_normalize=self.length_normalize,
                progress=self.progress,
                chat_template=self.chat_template,
                desc=self.name,
            )
            predictions, correct = [], 0
            for ex, opts, score in zip(self.examples, options, scores):
                gold = ex["answer"] if isinstance(ex["answer"], int) else opts.index(str(ex["answer"]))
                chosen = max(range(len(opts)), key=lambda i, s=score: s[i])
                correct += chosen == gold
                predictions.append({"chosen": chosen, "gold": gold, "logprobs": score, "correct": chosen == gold})
        total = len(self.examples)
        return {"score": correct / total, "correct": int(correct), "total": total, "predictions": predictions}

    def __call__(self, model, tokenizer=None) -> float:
        return self.evaluate(model, tokenizer)["score"]

    def __repr__(self) -> str:
        return f"SpecialityEval.{self.kind}({len(self.examples)} examples, name={self.name!r})"


# ------------------------------------------------------------------ versatility

COMPONENTS = ("probes_mc", "probes_gen", "ce", "kl")


class VersatilityEval:
    """Versatility of a model relative to its base model, as one number (1.0 for the base model).

    Up to four measures, each turned into a *retention* `R` that is 1.0 for the base model:

    - `probes_mc`: accuracy on multiple-choice probes / the base model's accuracy on them;
    - `probes_gen`: accuracy on short-answer probes (greedy; by default the answer, or one of its `aliases`, must
      appear as whole words in the reply: `probe_match="contains"`) / the base model's;
    - `ce`: `exp(-(CE_tuned - CE_base))`, with `CE` the mean token cross-entropy on general text (nats). The increase
      `CE_tuned - CE_base` is PEFT's "forgetting" metric; `exp(-x)` makes it the perplexity ratio `PPL_base / PPL_tuned`;
    - `kl`: `exp(-KL)`, with `KL` the mean over general-text tokens of `KL(base || tuned)` of the next-token
      distributions (label-free: how far the model moved where nothing was taught).

    `score = sum_c w_c * R_c / sum_c w_c` over the measures present (`weights`, default 1 each). A probe set the base
    model scores 0 on cannot be relative and is left out, with a warning. Retentions above 1 are kept (a fine-tune can
    raise a probe accuracy; likelihood-scored multiple choice is prone to that format effect, which is why the
    label-free measures are there).

    The base model's values are computed once, by `prepare(base_model)` (or `base_model=` in `default`), and kept:
    the top-`kl_top_k` next-token log-probabilities of the base model at every general-text position (`KL` is computed
    over those tokens plus one "rest" bucket, a lower bound of the full-vocabulary `KL` that is exact when `kl_top_k`
    covers the vocabulary; measured on SmolLM2-135M after 6 arithmetic steps, top-256 gave 94% of the exact value,
    top-1024 98%), its mean `CE`, and its probe accuracies. `reference_state()` / `load_reference_state()`
    carry them between runs.

    Example:

    ```python
    >>> vers = VersatilityEval.default(texts, probes=facts, base_model=base, tokenizer=tok)  # doctest: +SKIP
    >>> vers(base)  # doctest: +SKIP
    1.0
    ```
    """

    def __init__(
        self,
        general_texts: Sequence[str] | None = None,
        probes: Sequence[Mapping[str, Any]] | None = None,
        *,
        tokenizer=None,
        max_length: int = 256,
        batch_size: int = 4,
        kl_top_k: int = 256,
        max_new_tokens: int = 16,
        weights: Mapping[str, float] | None = None,
        progress: bool = True,
        chat_template: bool | None = None,
        probe_match: str = "contains",
    ):
        texts = [t for t in (general_texts or []) if t and t.strip()]
        probes = list(probes or [])
        if not texts and not probes:
            raise CoFiTuneError("the versatility eval set is empty: pass `general_texts`, `probes`, or both.")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(COMPONENTS))
        if unknown or any(w < 0 for w in weights.values()):
            raise CoFiTuneError(f"`weights` takes non-negative values for {COMPONENTS}, got {dict(weights)}.")
        if kl_top_k < 1 or max_length < 2 or batch_size < 1:
            raise CoFiTuneError(
                f"`kl_top_k` and `batch_size` must be >= 1 and `max_length` >= 2, got {kl_top_k}, {batch_size}, "
                f"{max_length}."
            )
        self.general_texts = texts
        self.probes = probes
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.kl_top_k = kl_top_k
        self.weights = {c: float(weights.get(c, 1.0)) for c in COMPONENTS}
        self.progress = progress
        mc = [p for p in probes if "options" in p]
        gen = [p for p in probes if "options" not in p]
        common = {"tokenizer": tokenizer, "progress": progress, "chat_template": chat_template}
        self.probe_evals: dict[str, SpecialityEval] = {}
        if mc:
            self.probe_evals["probes_mc"] = SpecialityEval.multiple_choice(mc, name="probes (choice)", **common)
        if gen:
            self.probe_evals["probes_gen"] = SpecialityEval.exact_match(
                gen, max_new_tokens=max_new_tokens, match=probe_match, name="probes (answer)", **common
            )
        self.reference: dict[str, Any] | None = None

    @classmethod
    def default(
        cls,
        general_texts: Sequence[str] | None,
        probes: Sequence[Mapping[str, Any]] | None = None,
        *,
        base_model=None,
        tokenizer=None,
        **kwargs,
    ) -> VersatilityEval:
        """The project's versatility measure: probes (if any) plus CE drift and KL on `general_texts`.

        Args:
            general_texts (`Sequence[str]`): general prose (not the fine-tuning domain), a few thousand tokens.
            probes (`Sequence[Mapping]`, *optional*): items with `options` (multiple choice) or a short `answer`.
            base_model (*optional*): the base model; given, its reference values are computed now (else call
                `prepare` before scoring; the search does that itself).
            tokenizer (*optional*): the tokenizer; also accepted by each call.
            **kwargs: `max_length`, `batch_size`, `kl_top_k`, `max_new_tokens`, `weights`, `progress`,
                `chat_template`, `probe_match` (see the class docstring).
        """
        evaluator = cls(general_texts, probes, tokenizer=tokenizer, **kwargs)
        if base_model is not None:
            evaluator.prepare(base_model, tokenizer)
        return evaluator

    @property
    def fingerprint(self) -> str:
        return _fingerprint([self.general_texts, self.probes, self.max_length, self.kl_top_k, self.weights])

    # -- general-text pass

    def _general_positions(self, model, tokenizer):
        """Yields the `[positions, vocab]` next-token log-probabilities and targets of each general text, in order."""
        device, pad = _device_of(model), pad_id_of(tokenizer)
        encoded = []
        for text in self.general_texts:
            ids = tokenizer(text)["input_ids"][: self.max_length]
            if len(ids) >= 2:
                encoded.append((ids, ids))
        if not encoded:
            raise CoFiTuneError("every general text is shorter than 2 tokens; pass longer `general_texts`.")
        starts = range(0, len(encoded), self.batch_size)
        for start in tqdm(starts, desc="general text", disable=not self.progress, leave=False):
            chunk = encoded[start : start + self.batch_size]
            batch = collate(chunk, pad)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            for row, (ids, _) in enumerate(chunk):
                n = len(ids) - 1
                logp = torch.log_softmax(logits[row, :n].float(), dim=-1)  # [positions, vocab]
                yield logp, batch["input_ids"][row, 1 : n + 1].to(device)

    @staticmethod
    def _rest(logp_top: torch.Tensor) -> torch.Tensor:
        """log(1 - sum(exp(logp_top))): the log-mass outside the top-k tokens, `[positions]`."""
        x = torch.logsumexp(logp_top, dim=-1).clamp(max=-1e-7)
        return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

    @torch.no_grad()
    def prepare(self, base_model, tokenizer=None) -> dict[str, Any]:
        """Compute and keep the base model's reference values; returns them (without the tensors)."""
        tokenizer = _check_tokenizer(tokenizer or self.tokenizer)
        was_training = base_model.training
        base_model.eval()
        ref: dict[str, Any] = {"fingerprint": self.fingerprint, "top_logp": [], "top_idx": [], "rest": []}
        try:
            if self.general_texts:
                ce_sum, count = 0.0, 0
                for logp, targets in self._general_positions(base_model, tokenizer):
                    k = min(self.kl_top_k, logp.shape[-1])
                    top = logp.topk(k, dim=-1)  # [positions, k]
                    ref["top_logp"].append(top.values.cpu())
                    ref["top_idx"].append(top.indices.to(torch.int32).cpu())  # int32 halves the reference
                    ref["rest"].append(self._rest(top.values).cpu() if k < logp.shape[-1] else None)
                    ce_sum += float(-logp.gather(-1, targets[:, None]).sum())
                    count += targets.numel()
                ref["ce"] = ce_sum / count
                ref["tokens"] = count
        finally:
            base_model.train(was_training)
        for key, evaluator in self.probe_evals.items():
            acc = evaluator(base_model, tokenizer)
            ref[key] = acc
            if acc == 0:
                warnings.warn(
                    f"the base model scores 0 on the {key} probes, so they cannot measure retention and are left out "
                    "of versatility; use probes the base model partly solves.",
                    stacklevel=2,
                )
        self.reference = ref
        logger.info("versatility reference of the base model: %s", self._summary(ref))
        return {k: v for k, v in ref.items() if k not in ("top_logp", "top_idx", "rest")}

    @staticmethod
    def _summary(ref: Mapping[str, Any]) -> str:
        keys = ("ce", "tokens", "probes_mc", "probes_gen")
        return ", ".join(
            f"{k}={ref[k]:.4g}" if isinstance(ref[k], float) else f"{k}={ref[k]}" for k in keys if k in ref
        )

    def reference_state(self) -> dict[str, Any]:
        """The base model's reference values, for `torch.save` (the search keeps them next to its results)."""
        if self.reference is None:
            raise CoFiTuneError("no reference yet: call `prepare(base_model)` first.")
        return dict(self.reference)

    def load_reference_state(self, state: Mapping[str, Any]) -> None:
        """Restore reference values saved by `reference_state`; they must come from the same texts and probes."""
        if state.get("fingerprint") != self.fingerprint:
            raise CoFiTuneError(
                "the saved versatility reference was computed on other general texts, probes or settings; "
                "call `prepare(base_model)` again."
            )
        self.reference = dict(state)

    @torch.no_grad()
    def evaluate(self, model, tokenizer=None) -> dict[str, Any]:
        """Score `model`: `{"score", "components": {name: retention}, "ce", "ce_base", "ce_increase", "kl", ...}`."""
        if self.reference is None:
            raise CoFiTuneError(
                "VersatilityEval has no base-model reference: call `prepare(base_model)` or pass `base_model=` to "
                "`VersatilityEval.default` before scoring a tuned model."
            )
        tokenizer = _check_tokenizer(tokenizer or self.tokenizer)
        ref = self.reference
        result: dict[str, Any] = {}
        components: dict[str, float] = {}
        if self.general_texts:
            was_training = model.training
            model.eval()
            ce_sum = kl_sum = 0.0
            count = 0
            try:
                for i, (logp, targets) in enumerate(self._general_positions(model, tokenizer)):
                    p_logp = ref["top_logp"][i].to(logp.device)  # [positions, k]
                    q_logp = logp.gather(-1, ref["top_idx"][i].to(logp.device, torch.long))  # [positions, k]
                    kl = (p_logp.exp() * (p_logp - q_logp)).sum(-1)  # [positions]
                    if ref["rest"][i] is not None:
                        p_rest = ref["rest"][i].to(logp.device)
                        q_rest = self._rest(q_logp).clamp(min=-69.0)
                        kl = kl + p_rest.exp() * (p_rest - q_rest)
                    kl_sum += float(kl.sum())
                    ce_sum += float(-logp.gather(-1, targets[:, None]).sum())
                    count += targets.numel()
            finally:
                model.train(was_training)
            ce = ce_sum / count
            result.update(ce=ce, ce_base=ref["ce"], ce_increase=ce - ref["ce"], kl=kl_sum / count)
            components["ce"] = math.exp(-(ce - ref["ce"]))
            components["kl"] = math.exp(-result["kl"])
        for key, evaluator in self.probe_evals.items():
            acc = evaluator(model, tokenizer)
            result[f"{key}_accuracy"] = acc
            result[f"{key}_base_accuracy"] = ref[key]
            if ref[key] > 0:
                components[key] = acc / ref[key]
        weighted = {c: r for c, r in components.items() if self.weights[c] > 0}
        if not weighted:
            raise CoFiTuneError(
                "no versatility measure is left: every weighted measure is missing or its base value is 0 "
                f"(weights {self.weights}, measures {sorted(components)})."
            )
        total = sum(self.weights[c] for c in weighted)
        result["score"] = sum(self.weights[c] * r for c, r in weighted.items()) / total
        result["components"] = components
        return result

    def __call__(self, model, tokenizer=None) -> float:
        return self.evaluate(model, tokenizer)["score"]

    def __repr__(self) -> str:
        return (
            f"VersatilityEval({len(self.general_texts)} general texts, {len(self.probes)} probes, "
            f"prepared={self.reference is not None})"
        )
