"""cofitune-peft: CoFiTune (arXiv 2404.10306) as a PEFT method.

Importing this package registers the `COFITUNE` peft type with PEFT, so `get_peft_model`, `PeftModel.from_pretrained`
and `AutoPeftModelForCausalLM` work with CoFiTune adapters. It loads the method core only; the experiment kit
(evaluation, search, training loop, data, demo) lives in `cofitune_peft.kit` and is imported on first use.
"""

from __future__ import annotations

import importlib

from . import _compat, _moved, hub
from .callback import CoFiTuneCallback
from .config import CoFiTuneConfig
from .errors import CoFiTuneError
from .estimation import estimate_importance
from .importance import Importance
from .layer import CoFiTuneLayer
from .model import CoFiTuneModel, set_importance
from .model_card import write_model_card
from .optim import CoFiTuneAdamW

__version__ = "0.3.0"

_compat.register(CoFiTuneConfig, CoFiTuneModel, write_model_card, hub.prepare_for_save, hub.push_to_hub)
_moved.install()

# Names of the experiment kit that `from cofitune_peft import ...` still finds (imported on first use).
_KIT_NAMES = {
    "SearchResult": "cofitune_peft.kit.search",
    "SpecialityEval": "cofitune_peft.kit.evaluation",
    "VersatilityEval": "cofitune_peft.kit.evaluation",
    "search_layers": "cofitune_peft.kit.search",
    "train_sft": "cofitune_peft.kit.training",
}


def __getattr__(name: str):
    if name in _KIT_NAMES:
        return getattr(importlib.import_module(_KIT_NAMES[name]), name)
    raise AttributeError(f"module 'cofitune_peft' has no attribute {name!r}")


__all__ = [
    "CoFiTuneAdamW",
    "CoFiTuneCallback",
    "CoFiTuneConfig",
    "CoFiTuneError",
    "CoFiTuneLayer",
    "CoFiTuneModel",
    "Importance",
    "__version__",
    "estimate_importance",
    "set_importance",
]
