"""Spec., Vers. and Uni.: CoFiTune's scores of a tuned model relative to reference models (arXiv 2404.10306).

The formulas, hand-checkable:

- `Spec. = (S_tuned - S_base) / (S_full - S_base)`: the tuned model's speciality gain as a fraction of full
  fine-tuning's gain (1.0 = as much as full fine-tuning, 0.0 = no gain over the base model).
- `Vers. = V_tuned / V_base`: the tuned model's versatility relative to the base model (1.0 = none lost).
- `Uni. = w * Spec. + (1 - w) * Vers.`, `w = 0.5` by default (the project reports the mean).

Division by zero raises `CoFiTuneError`: `Spec.` is undefined when full fine-tuning did not move the speciality
score, `Vers.` when the base model's versatility is zero.
"""

from __future__ import annotations

from cofitune_peft import CoFiTuneError


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
