"""cofitune-peft: CoFiTune (arXiv 2404.10306) as a PEFT method.

Importing this package registers the `COFITUNE` peft type with PEFT, so `get_peft_model`, `PeftModel.from_pretrained`
and `AutoPeftModelForCausalLM` work with CoFiTune adapters.
"""

from __future__ import annotations

from . import _peft_compat
from .callback import CoFiTuneCallback
from .config import CoFiTuneConfig
from .errors import CoFiTuneError
from .estimation import estimate_importance
from .evaluation import SpecialityEval, VersatilityEval
from .importance import Importance
from .layer import CoFiTuneLayer
from .model import CoFiTuneModel
from .search import SearchResult, search_layers
from .training import train_sft

__version__ = "0.1.0"

_peft_compat.register(CoFiTuneConfig, CoFiTuneModel)

__all__ = [
    "CoFiTuneCallback",
    "CoFiTuneConfig",
    "CoFiTuneError",
    "CoFiTuneLayer",
    "CoFiTuneModel",
    "Importance",
    "SearchResult",
    "SpecialityEval",
    "VersatilityEval",
    "__version__",
    "estimate_importance",
    "search_layers",
    "train_sft",
]
