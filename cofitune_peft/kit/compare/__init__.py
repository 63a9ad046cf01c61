"""Method comparison for CoFiTune (arXiv 2404.10306): every method at its own best learning rate, chosen on a
validation split, scored on a test split.

- `methods`: the registry of builders (`METHODS`, `register_method`, `DEFAULT_LEARNING_RATES`, `MethodSettings`,
  `PenaltyToBase` for the L1/L2-to-base baselines; derived methods such as `wiseft` and `cofitune_alpha` score
  post-hoc values of their parent's runs without training);
- `fine_levels`: fine levels that are not a learning rate (`cofitune_pull`: `ImportancePull`; `cofitune_restrained`;
  `cofitune_l2out`) and the replay baselines (`ReplayMix`: general examples mixed into the training data);
- `penalties`: `TrainingWrapper` (a method that wraps the model while it trains) and `PenaltyToBase`;
- `runner`: `compare_methods`, cached and resumable per run, every run's per-item scores kept;
- `report`: `ComparisonResult` (frontier, selection, table, JSON, plot), retentions capped at 1 for ranking;
- `intervals`: paired bootstrap intervals over items and the rule that calls a difference real or noise;
- `tasks`: the offline tasks (arithmetic, words, knowledge) as evaluation splits, the replay pool, the model loader;
- `command`: `cofitune compare` (`add_compare_arguments`, `compare_command`).
"""

from __future__ import annotations

from .command import add_compare_arguments, compare_command
from .methods import (
    DEFAULT_LEARNING_RATES,
    METHODS,
    Method,
    MethodSettings,
    PenaltyToBase,
    register_method,
)
from .report import ComparisonResult, capped_retention, select
from .runner import DEFAULT_METHODS, EvalSplit, compare_methods

__all__ = [
    "DEFAULT_LEARNING_RATES",
    "DEFAULT_METHODS",
    "METHODS",
    "ComparisonResult",
    "EvalSplit",
    "Method",
    "MethodSettings",
    "PenaltyToBase",
    "add_compare_arguments",
    "capped_retention",
    "compare_command",
    "compare_methods",
    "register_method",
    "select",
]
