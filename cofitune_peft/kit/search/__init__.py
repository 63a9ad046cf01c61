"""The coarse level of CoFiTune (arXiv 2404.10306): a budgeted tree search over layer windows and modules.

The paper picks the trained (window, module) by an "empirical tree search" and released no code for it. Here:

1. `window`: the paper's seven windows for N layers (quarters and halves) with the FFN;
2. `module`: in the best `width` windows, MHA and FFN+MHA as well;
3. `refine`: the best candidate's window shifted down/up, shrunk and grown by ~N/8.

Every candidate trains a fresh model with the same data, steps, batch and seed (`train_sft`), and is scored by
Spec., Vers. and Uni. (`cofitune_peft.kit.evaluation`) against the base model and a full fine-tuning reference. Results
are written per candidate as JSON (atomically), so an interrupted search resumes where it stopped.

The modules:

- `tree`: the candidate windows of each level, and `LayerSearch` (with `search_layers`, its one-call form), which
  trains, scores and caches them;
- `result`: `SearchResult`, the table of candidates with Spec. / Vers. / Uni., their ranking, storage and plot;
- `commands`: the `cofitune search` and `cofitune report` commands.
"""

from __future__ import annotations

from .commands import add_report_arguments, add_search_arguments, read_general_text, report_command, search_command
from .result import TABLE_COLUMNS, SearchResult
from .tree import LEVELS, MODULES, LayerSearch, candidate_key, paper_windows, refine_windows, search_layers

__all__ = [
    "LEVELS",
    "MODULES",
    "TABLE_COLUMNS",
    "LayerSearch",
    "SearchResult",
    "add_report_arguments",
    "add_search_arguments",
    "candidate_key",
    "paper_windows",
    "read_general_text",
    "refine_windows",
    "report_command",
    "search_command",
    "search_layers",
]
