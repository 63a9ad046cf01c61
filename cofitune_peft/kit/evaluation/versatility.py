"""Versatility: how much of the base model's general ability a tuned model keeps, as one number.

`VersatilityEval` turns several measures into one number that is 1.0 for the base model by construction (see its
docstring): probe accuracies relative to the base model's, `exp(-(CE_tuned - CE_base))` (the base/tuned perplexity
ratio on general text, PEFT's "forgetting" metric as a retention) and `exp(-KL(base || tuned))` per token.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from cofitune_peft import CoFiTuneError
from cofitune_peft.utils import device_of

from ..fingerprint import fingerprint as settings_fingerprint
from ..training.encoding import collate, pad_id_of
from .model_passes import _check_tokenizer, eval_mode
from .speciality import SpecialityEval

logger = logging.getLogger(__name__)

COMPONENTS = ("probes_mc", "probes_gen", "ce", "kl")


class BaseModelReference:
    """The base model's reference values of a versatility evaluator, and their round trip through a file.

    A subclass computes `reference` in `prepare(base_model)` (`None` before), stores its `fingerprint` in it, and names
    in `_stale_reference` what differs when a saved reference's fingerprint is not its own.
    """

    reference: dict[str, Any] | None
    fingerprint: str
    _stale_reference: str

    def reference_state(self) -> dict[str, Any]:
        """The base model's reference values, for `kit.state_file.save_state` (the search and the comparison keep them
        next to their results)."""
        if self.reference is None:
            raise CoFiTuneError("no reference yet: call `prepare(base_model)` first.")
        return dict(self.reference)

    def load_reference_state(self, state: Mapping[str, Any]) -> None:
        """Restore reference values saved by `reference_state`; they must come from the same data and settings."""
        if state.get("fingerprint") != self.fingerprint:
            raise CoFiTuneError(self._stale_reference)
        self.reference = dict(state)


class VersatilityEval(BaseModelReference):
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
    label-free measures are there). A probe may set its own `match` (e.g. `"token"` for chemical symbols), `rejected`
    and `first_line` (see `SpecialityEval.exact_match`); `generation_batch_size` (default 8) prompts are generated
    together.

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

    _stale_reference = (
        "the saved versatility reference was computed on other general texts, probes or settings; "
        "call `prepare(base_model)` again."
    )

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
        generation_batch_size: int = 8,
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
                gen, max_new_tokens=max_new_tokens, match=probe_match, name="probes (answer)",
                batch_size=generation_batch_size, **common,
            )  # fmt: skip
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
                `chat_template`, `probe_match`, `generation_batch_size` (see the class docstring).
        """
        evaluator = cls(general_texts, probes, tokenizer=tokenizer, **kwargs)
        if base_model is not None:
            evaluator.prepare(base_model, tokenizer)
        return evaluator

    @property
    def fingerprint(self) -> str:
        """A hash of the general texts, probes and settings (the search stores it to detect a changed eval)."""
        return settings_fingerprint([self.general_texts, self.probes, self.max_length, self.kl_top_k, self.weights])

    # -- general-text pass

    def _general_positions(self, model, tokenizer):
        """Yields the `[positions, vocab]` next-token log-probabilities and targets of each general text, in order."""
        device, pad = device_of(model), pad_id_of(tokenizer)
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
        ref: dict[str, Any] = {"fingerprint": self.fingerprint, "top_logp": [], "top_idx": [], "rest": []}
        with eval_mode(base_model):
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

    @torch.no_grad()
    def evaluate(self, model, tokenizer=None) -> dict[str, Any]:
        """Score `model`: `{"score", "components": {name: retention}, "ce", "ce_base", "ce_increase", "kl", "items",
        ...}`.

        `items` holds the per-item values that paired bootstrap intervals resample: `probes_gen` / `probes_mc` (1 for
        a correct probe, 0 otherwise, in probe order) and, per general text, `ce_sum` and `kl_sum` (summed over its
        tokens) and `tokens`.
        """
        if self.reference is None:
            raise CoFiTuneError(
                "VersatilityEval has no base-model reference: call `prepare(base_model)` or pass `base_model=` to "
                "`VersatilityEval.default` before scoring a tuned model."
            )
        tokenizer = _check_tokenizer(tokenizer or self.tokenizer)
        ref = self.reference
        result: dict[str, Any] = {}
        components: dict[str, float] = {}
        items: dict[str, list] = {}
        if self.general_texts:
            ce_sums, kl_sums, counts = [], [], []
            with eval_mode(model):
                for i, (logp, targets) in enumerate(self._general_positions(model, tokenizer)):
                    p_logp = ref["top_logp"][i].to(logp.device)  # [positions, k]
                    q_logp = logp.gather(-1, ref["top_idx"][i].to(logp.device, torch.long))  # [positions, k]
                    kl = (p_logp.exp() * (p_logp - q_logp)).sum(-1)  # [positions]
                    if ref["rest"][i] is not None:
                        p_rest = ref["rest"][i].to(logp.device)
                        q_rest = self._rest(q_logp).clamp(min=-69.0)
                        kl = kl + p_rest.exp() * (p_rest - q_rest)
                    kl_sums.append(float(kl.sum()))
                    ce_sums.append(float(-logp.gather(-1, targets[:, None]).sum()))
                    counts.append(targets.numel())
            count = sum(counts)
            ce = sum(ce_sums) / count
            result.update(ce=ce, ce_base=ref["ce"], ce_increase=ce - ref["ce"], kl=sum(kl_sums) / count)
            components["ce"] = math.exp(-(ce - ref["ce"]))
            components["kl"] = math.exp(-result["kl"])
            items.update(ce_sum=ce_sums, kl_sum=kl_sums, tokens=counts)
        for key, evaluator in self.probe_evals.items():
            scored = evaluator.evaluate(model, tokenizer)
            acc = scored["score"]
            items[key] = [int(bool(p["correct"])) for p in scored["predictions"]]
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
        result["items"] = items
        return result

    def __call__(self, model, tokenizer=None) -> float:
        return self.evaluate(model, tokenizer)["score"]

    def __repr__(self) -> str:
        return (
            f"VersatilityEval({len(self.general_texts)} general texts, {len(self.probes)} probes, "
            f"prepared={self.reference is not None})"
        )
