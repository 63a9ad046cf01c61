"""Speciality and versatility scorers, and the Spec. / Vers. / Uni. scores of CoFiTune (arXiv 2404.10306).

The paper measures a fine-tuned model on its domain task ("speciality") and on general abilities ("versatility"),
and reports both relative to reference models. The pieces:

- `speciality`: `SpecialityEval`, accuracy on the task by greedy exact match or by multiple choice;
- `versatility`: `VersatilityEval`, probe accuracies, cross-entropy drift and KL to the base model on general text,
  as one retention that is 1.0 for the base model;
- `scores`: `speciality_score`, `versatility_score` and `unified_score`, the paper's Spec., Vers. and Uni.;
- `answers`: `extract_number` (the number a reply gives), answer normalisation and matching for exact match;
- `model_passes`: the batched greedy generation and option log-likelihood passes the evaluators share.
"""

from __future__ import annotations

from .answers import answers_match, extract_number, first_line, normalize_answer, token_match
from .model_passes import generate_answers, option_logprobs
from .scores import speciality_score, unified_score, versatility_score
from .speciality import SpecialityEval
from .versatility import COMPONENTS, VersatilityEval

__all__ = [
    "COMPONENTS",
    "SpecialityEval",
    "VersatilityEval",
    "answers_match",
    "extract_number",
    "first_line",
    "generate_answers",
    "normalize_answer",
    "option_logprobs",
    "speciality_score",
    "token_match",
    "unified_score",
    "versatility_score",
]
