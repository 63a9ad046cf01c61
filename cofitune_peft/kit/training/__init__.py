"""Supervised fine-tuning for the kit: `train_sft`, the loop every method is trained with, and the encoding it shares
with the evaluators.

- `loop`: `train_sft`, a small deterministic loop (the same data order, batches, schedule and seed for any model),
  and its learning-rate schedule `cosine_with_warmup`;
- `encoding`: chat rendering (`render_prompt`, `has_chat_template`), `encode_example` (token ids and loss labels),
  `collate` (padding) and `pad_id_of`, which the evaluators use to tokenise prompts the way training does.
"""

from __future__ import annotations

from .encoding import IGNORE_INDEX, collate, encode_example, has_chat_template, pad_id_of, render_prompt
from .loop import cosine_with_warmup, train_sft

__all__ = [
    "IGNORE_INDEX",
    "collate",
    "cosine_with_warmup",
    "encode_example",
    "has_chat_template",
    "pad_id_of",
    "render_prompt",
    "train_sft",
]
