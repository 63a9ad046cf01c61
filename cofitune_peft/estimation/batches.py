"""The data `estimate_importance` takes, checked up front and turned into `(input_ids, attention_mask)` batches.

Texts (strings, dicts with a text field, or chat `messages` rendered with the tokenizer's chat template) are tokenized,
truncated and padded here (right-padded to the batch's longest text, or as `padding` and `padding_side` say); a
DataLoader's batches of token ids are used as given. Under `torch.distributed` each rank takes its share: every
`world_size`-th text, or every `world_size`-th batch of a DataLoader.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import CoFiTuneError


def _row_text(row: Any, text_field: str | None, tokenizer) -> tuple[str, bool]:
    """`(text, is_chat)` of one example: a string, or a dict with a text field or chat `messages`."""
    if isinstance(row, str):
        return row, False
    if not isinstance(row, dict):
        raise CoFiTuneError(f"each example of `data` must be a string or a dict, got {type(row).__name__}.")
    field = text_field or ("text" if "text" in row else "messages" if "messages" in row else None)
    if field is None or field not in row:
        raise CoFiTuneError(
            f"an example of `data` has fields {sorted(row)} but no `{text_field or 'text'}` "
            f"{'' if text_field else 'or `messages` '}field; pass `text_field` to name the text column."
        )
    value = row[field]
    if isinstance(value, str):
        return value, False
    if isinstance(value, list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise CoFiTuneError(
                f"`data` holds chat messages in `{field}` but the tokenizer has no chat template; set "
                "`tokenizer.chat_template` or pass plain text."
            )
        return tokenizer.apply_chat_template(value, tokenize=False), True
    raise CoFiTuneError(
        f"field `{field}` of `data` must hold a string or a list of messages, got {type(value).__name__}."
    )


def _text_batches(
    data, tokenizer, text_field, num_samples, batch_size, max_length, rank, world, padding="longest", side="right"
):
    """Batches `(input_ids, attention_mask)` of this rank's share of the first `num_samples` texts, padded on `side`
    to the batch's longest text (`padding="longest"`) or to `max_length` tokens (`"max_length"`, the authors')."""
    texts = (_row_text(row, text_field, tokenizer) for row in data)
    texts = itertools.islice(((t, chat) for t, chat in texts if t.strip()), num_samples)
    texts = itertools.islice(texts, rank, None, world)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    while True:
        chunk = list(itertools.islice(texts, batch_size))
        if not chunk:
            return
        ids = [
            tokenizer(t, add_special_tokens=not chat, truncation=True, max_length=max_length)["input_ids"][:max_length]
            for t, chat in chunk
        ]
        ids = [i for i in ids if i]
        if not ids:
            continue
        width = max_length if padding == "max_length" else max(map(len, ids))
        rows = []
        for i in ids:
            pads = [pad] * (width - len(i))
            real, none = [1] * len(i), [0] * len(pads)
            rows.append((pads + i, none + real) if side == "left" else (i + pads, real + none))
        input_ids = torch.tensor([r for r, _ in rows])  # [batch, seq]
        attention_mask = torch.tensor([m for _, m in rows])  # [batch, seq]
        yield input_ids, attention_mask, len(chunk)


def _loader_batches(loader, num_samples, rank, world):
    """Batches of a DataLoader of dicts with `input_ids` (and `attention_mask`), split over ranks by batch index."""
    from torch.utils.data.distributed import DistributedSampler

    sharded = isinstance(getattr(loader, "sampler", None), DistributedSampler)
    seen = 0
    for index, batch in enumerate(loader):
        if num_samples is not None and seen >= num_samples:
            return
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise CoFiTuneError(
                "a DataLoader passed as `data` must yield dicts with `input_ids` (and `attention_mask`), got "
                f"{type(batch).__name__}{' with keys ' + str(sorted(batch)) if isinstance(batch, dict) else ''}."
            )
        input_ids = torch.as_tensor(batch["input_ids"])  # [batch, seq]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask)  # [batch, seq]
        if num_samples is not None:
            input_ids, mask = input_ids[: num_samples - seen], mask[: num_samples - seen]
        seen += input_ids.shape[0]
        if sharded or index % world == rank:
            yield input_ids, mask, input_ids.shape[0]


def _describe(data) -> str:
    name = type(data).__name__
    info = getattr(data, "info", None)
    label = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    size = f"{len(data)} examples" if hasattr(data, "__len__") else "streamed"
    return f"{name}({label + ', ' if label else ''}{size})"


def _check_data(data, tokenizer) -> bool:
    """Validate `data` up front; True for a DataLoader (pre-tokenized)."""
    from torch.utils.data import DataLoader

    if isinstance(data, DataLoader):
        return True
    if isinstance(data, (str, bytes, os.PathLike)):
        raise CoFiTuneError(
            f"`data` must be a data set, a list of strings or a DataLoader, got the {type(data).__name__} "
            f"{str(data)[:60]!r}; to read a file use `cofitune importance --data PATH` or load it first."
        )
    if isinstance(data, dict):
        raise CoFiTuneError(
            f"`data` is a {type(data).__name__} with keys {sorted(data)[:8]}; pass one split, e.g. `data['train']`."
        )
    if not isinstance(data, Iterable):
        raise CoFiTuneError(
            f"`data` must be iterable (data set, list of strings, DataLoader), got {type(data).__name__}."
        )
    if hasattr(data, "__len__") and len(data) == 0:
        raise CoFiTuneError("`data` is empty; pass at least one non-empty text.")
    if tokenizer is None:
        raise CoFiTuneError("`tokenizer` is required to tokenize text `data`; pass the model's tokenizer.")
    return False
