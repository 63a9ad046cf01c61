"""Estimate unit importance with the KL robustness proxy of DAS (Ke et al., ICLR 2023), as CoFiTune uses it.

CoFiTune (Zhang et al. 2024, arXiv 2404.10306) protects the units that matter for versatility. A unit's importance is
the gradient of a robustness loss with respect to a virtual gate on that unit: the same batch runs twice with a small
dropout, the loss is `KL(softmax(logits_2) || softmax(logits_1))` over non-padding tokens, and only the gates receive
gradients. The pieces:

- `gates`: the virtual gates and the injected dropout, as hooks on stock transformers modules, and the KL proxy;
- `batches`: the examples (texts, chat messages, or a DataLoader of token ids) as batches, split over ranks;
- `estimate`: `estimate_importance`, which accumulates the gates' gradients into an `Importance`;
- `recipes`: the default estimator's choices and the authors' code's (`recipe="authors"`), option by option;
- `attention`: dropout on the attention probabilities (the authors' placement) and the attention kernel it needs.
"""

from __future__ import annotations

from .estimate import ACCUMULATE, SIGNALS, estimate_importance
from .estimate import _estimate_raw as _estimate_raw
from .recipes import RECIPES

__all__ = ["ACCUMULATE", "RECIPES", "SIGNALS", "estimate_importance"]
