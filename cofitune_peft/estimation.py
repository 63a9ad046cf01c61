"""Estimate unit importance with the KL robustness proxy of DAS (Ke et al., ICLR 2023), as CoFiTune uses it.

CoFiTune (Zhang et al. 2024, arXiv 2404.10306) protects the units that matter for versatility. A unit's importance is
the gradient of a robustness loss with respect to a virtual gate on that unit: the same batch runs twice with a small
dropout, the loss is `KL(softmax(logits_2) || softmax(logits_1))` over non-padding tokens, and only the gates receive
gradients. Gates (all ones) act through hooks on stock transformers modules, for every architecture in
`architectures.ARCHITECTURES`:

- heads `[layers, num_heads]`: the input of the attention output projection, viewed `[..., heads, head_dim]`;
- intermediate `[layers, intermediate_size]`: the input of the FFN down projection;
- output `[layers, hidden_size]`: the output of the FFN down projection.

Where the noise comes from. The authors inject dropout p=0.003 on the attention probabilities and the FFN output of
LLaMA, which has no dropout of its own. Attention probabilities are not reachable with SDPA or flash attention, so the
attention dropout here acts on the per-head attention output (the input of the output projection, where the head gates
sit), and the FFN dropout on the down projection's output, for every architecture alike. The model runs in *eval*
mode: its own dropout (0.1 in GPT-2 and OPT, none in LLaMA) is off, so the injected dropout is the only noise
everywhere, which is what train mode gives on LLaMA. The two passes are one forward of the batch stacked twice.

Dropout masks come from a generator seeded by `seed` and the batch's token ids, so a result does not depend on the
order of the batches (or on how batches are spread over ranks) and the global RNG is never drawn from.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import ArchSpec, dims_of, layer_index_regex, spec_for
from .errors import CoFiTuneError
from .importance import PARTS, Importance

logger = logging.getLogger(__name__)

ACCUMULATE = ("abs", "signed")


# ----------------------------------------------------------------------------------------------------------- gates


class _Gates:
    """Virtual gates and injected dropout, added to a model with hooks; `remove()` takes every hook off again."""

    def __init__(self, model: nn.Module, spec: ArchSpec, parts: Sequence[str], dropout: float):
        dims = dims_of(model, spec)
        attn, down = _modules_by_layer(model, spec, dims.num_layers)
        self.dims, self.dropout = dims, dropout
        self.gates: dict[str, list[torch.Tensor]] = {p: [] for p in parts}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seed = 0
        sizes = {"heads": dims.num_heads, "intermediate": dims.intermediate, "output": dims.hidden}
        for layer in range(dims.num_layers):
            for part in parts:
                weight = (attn if part == "heads" else down)[layer].weight
                gate = torch.ones(sizes[part], device=weight.device, dtype=torch.float32, requires_grad=True)
                self.gates[part].append(gate)
            heads = self.gates["heads"][layer] if "heads" in parts else None
            inter = self.gates["intermediate"][layer] if "intermediate" in parts else None
            out = self.gates["output"][layer] if "output" in parts else None
            self.handles.append(attn[layer].register_forward_pre_hook(self._attn_hook(heads)))
            if inter is not None:
                self.handles.append(down[layer].register_forward_pre_hook(self._down_in_hook(inter)))
            self.handles.append(down[layer].register_forward_hook(self._down_out_hook(out)))

    def flat(self) -> list[torch.Tensor]:
        return [g for part in self.gates.values() for g in part]

    def reseed(self, seed: int) -> None:
        self._seed = seed
        for gen in self._generators.values():
            gen.manual_seed(seed)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        gen = self._generators.get(x.device)
        if gen is None:
            gen = self._generators[x.device] = torch.Generator(device=x.device).manual_seed(self._seed)
        keep = torch.empty_like(x).bernoulli_(1.0 - self.dropout, generator=gen)
        return x * keep / (1.0 - self.dropout)

    def _attn_hook(self, gate: torch.Tensor | None):
        heads, head_dim = self.dims.num_heads, self.dims.head_dim

        def hook(module, args):
            x = args[0]  # [batch, seq, heads * head_dim]
            if gate is not None:
                x = (x.unflatten(-1, (heads, head_dim)) * gate.to(x.dtype)[:, None]).flatten(-2)
            return (self._drop(x), *args[1:])

        return hook

    @staticmethod
    def _down_in_hook(gate: torch.Tensor):
        def hook(module, args):
            return (args[0] * gate.to(args[0].dtype), *args[1:])  # [batch, seq, intermediate]

        return hook

    def _down_out_hook(self, gate: torch.Tensor | None):
        def hook(module, args, output):
            if gate is not None:
                output = output * gate.to(output.dtype)  # [batch, seq, hidden]
            return self._drop(output)

        return hook


def _modules_by_layer(model: nn.Module, spec: ArchSpec, num_layers: int) -> tuple[list[nn.Module], list[nn.Module]]:
    """The attention output and FFN down projections of each decoder layer (base layers of PEFT tuner layers)."""
    pattern = layer_index_regex(spec.layers_pattern)
    found: dict[str, dict[int, nn.Module]] = {spec.attn_out: {}, spec.ffn_down: {}}
    for key, module in model.named_modules():
        match = pattern.search(key)
        if match is None or match.group(2) not in found:
            continue
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        found[match.group(2)][int(match.group(1))] = module
    for name, by_layer in found.items():
        if sorted(by_layer) != list(range(num_layers)):
            raise CoFiTuneError(
                f"expected a `{name}` module in each of the {num_layers} decoder layers "
                f"(`{spec.layers_pattern}.<i>.{name}`) but found it in layers {sorted(by_layer)}; "
                "importance estimation needs the stock transformers module layout."
            )
        for module in by_layer.values():
            if not isinstance(getattr(module, "weight", None), torch.Tensor):
                raise CoFiTuneError(f"`{name}` is a {type(module).__name__} without a weight; cannot gate it.")
    return [found[spec.attn_out][i] for i in range(num_layers)], [found[spec.ffn_down][i] for i in range(num_layers)]


def _kl_proxy(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`KL(softmax(logits_2) || softmax(logits_1))` summed over non-padding tokens; both passes in one forward."""
    batch = input_ids.shape[0]
    logits = model(
        input_ids=input_ids.repeat(2, 1), attention_mask=attention_mask.repeat(2, 1), use_cache=False
    ).logits  # [2 * batch, seq, vocab]
    logp = F.log_softmax(logits.float(), dim=-1)
    kl = F.kl_div(logp[:batch], logp[batch:], log_target=True, reduction="none").sum(-1)  # [batch, seq]
    return (kl * attention_mask.to(kl.dtype)).sum()


# ------------------------------------------------------------------------------------------------------------ data


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


def _text_batches(data, tokenizer, text_field, num_samples, batch_size, max_length, rank, world):
    """Batches `(input_ids, attention_mask)` (right-padded) of this rank's share of the first `num_samples` texts."""
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
        width = max(map(len, ids))
        input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids])  # [batch, seq]
        attention_mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])  # [batch, seq]
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


# ------------------------------------------------------------------------------------------------------ estimation


@dataclass
class _Raw:
    parts: dict[str, torch.Tensor]  # part -> [layers, units], gradient sums divided by the token count
    num_tokens: int
    num_samples: int


def _validate(num_samples, batch_size, max_length, dropout, accumulate, parts) -> tuple[str, ...]:
    problems = []
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        problems.append(f"`num_samples` must be a positive int or None, got {num_samples!r}.")
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"`{name}` must be a positive int, got {value!r}.")
    if not isinstance(dropout, (int, float)) or not 0 < dropout < 1:
        problems.append(f"`dropout` must lie in (0, 1) (the paper uses 0.003), got {dropout!r}.")
    if accumulate not in ACCUMULATE:
        problems.append(f"`accumulate` must be one of {ACCUMULATE}, got {accumulate!r}.")
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    if not parts or set(parts) - set(PARTS) or len(set(parts)) != len(parts):
        problems.append(f"`parts` must be a non-empty selection of {PARTS} without repeats, got {parts!r}.")
    if problems:
        raise CoFiTuneError(" ".join(problems))
    return tuple(p for p in PARTS if p in parts)


def _estimate_raw(
    model: nn.Module,
    data,
    *,
    tokenizer=None,
    num_samples: int | None = 512,
    batch_size: int = 8,
    max_length: int = 256,
    dropout: float = 0.003,
    accumulate: str = "abs",
    seed: int = 0,
    parts: Sequence[str] = PARTS,
    text_field: str | None = None,
    progress: bool = True,
) -> _Raw:
    """The raw (un-normalised) scores behind `estimate_importance`; same arguments."""
    parts = _validate(num_samples, batch_size, max_length, dropout, accumulate, parts)
    is_loader = _check_data(data, tokenizer)
    is_peft = hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")
    base = model.get_base_model() if is_peft else model
    spec = spec_for(base)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    if is_loader:
        batches = _loader_batches(data, num_samples, rank, world)
    else:
        batches = _text_batches(data, tokenizer, text_field, num_samples, batch_size, max_length, rank, world)
    total = None
    if hasattr(data, "__len__") and not is_loader:
        total = len(range(rank, min(len(data), num_samples or len(data)), world))

    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    device = model.get_input_embeddings().weight.device
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    gates = None
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda))
            stack.enter_context(torch.enable_grad())
            if is_peft:
                stack.enter_context(model.disable_adapter())
            model.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            gates = _Gates(base, spec, parts, float(dropout))
            flat = gates.flat()
            sums = [torch.zeros_like(g) for g in flat]
            num_tokens = num_seen = 0
            bar = _progress_bar(total, disable=not progress or rank != 0)
            for input_ids, attention_mask, n in batches:
                digest = zlib.crc32(input_ids.to(torch.int64).cpu().numpy().tobytes())
                gates.reseed((seed * 0x9E3779B97F4A7C15 + digest) % 2**63)
                loss = _kl_proxy(model, input_ids.to(device), attention_mask.to(device))
                # autograd.grad returns this batch's gradient alone: no zeroing needed between batches.
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
                if any(g is None for g in grads):
                    raise CoFiTuneError(
                        f"the importance gates of this {type(base).__name__} were not reached in the forward pass; "
                        "its attention or FFN does not call the modules named in `architectures.ARCHITECTURES`."
                    )
                for acc, grad in zip(sums, grads):
                    acc += grad.abs() if accumulate == "abs" else grad
                num_tokens += int(attention_mask.sum())
                num_seen += n
                bar.update(n)
            bar.close()
    finally:
        if gates is not None:
            gates.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training

    flat_sums = torch.cat([s.detach().double().cpu() for s in sums])  # [total gate units]
    counts = torch.tensor([num_tokens, num_seen], dtype=torch.float64)
    if distributed:
        on = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
        packed = torch.cat([flat_sums, counts]).to(on)
        torch.distributed.all_reduce(packed)
        flat_sums, counts = packed[:-2].cpu(), packed[-2:].cpu()
    num_tokens, num_seen = int(counts[0]), int(counts[1])
    if num_tokens == 0:
        raise CoFiTuneError("`data` holds no non-empty text (0 tokens); pass at least one non-empty example.")
    out, offset, layers = {}, 0, gates.dims.num_layers
    for part, per_layer in gates.gates.items():
        width = per_layer[0].numel()
        out[part] = (flat_sums[offset : offset + layers * width].view(layers, width) / num_tokens).float()
        offset += layers * width
    return _Raw(out, num_tokens, num_seen)


def _progress_bar(total: int | None, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=disable, desc="importance", unit="sample", dynamic_ncols=True)


def estimate_importance(
    model: nn.Module,
    data,
    *,
    tokenizer=None,
    num_samples: int | None = 512,
    batch_size: int = 8,
    max_length: int = 256,
    dropout: float = 0.003,
    accumulate: str = "abs",
    seed: int = 0,
    parts: Sequence[str] = PARTS,
    text_field: str | None = None,
    progress: bool = True,
) -> Importance:
    """Estimate the importance of attention heads, FFN intermediate units and FFN outputs with the KL proxy.

    Each batch runs twice with injected dropout `dropout`; the gradient of `KL(softmax(logits_2) ||
    softmax(logits_1))`, summed over non-padding tokens, with respect to all-ones gates on the units is accumulated
    over batches and divided by the number of tokens. The model's weights, train/eval modes and `requires_grad` flags
    are left as they were, and a `PeftModel` is estimated on its base weights (adapters disabled). Under
    `torch.distributed` each rank takes every `world_size`-th example and the sums are all-reduced.

    Differences from the authors' code: the gate gradients are taken per batch (their code never zeroes the gates'
    `.grad`, so early batches count several times), and `accumulate="abs"` (the DAS paper's |grad|) is the default;
    `"signed"` sums signed gradients as their code does.

    Args:
        model (`nn.Module`): a transformers causal LM of a supported architecture, or a `peft.PeftModel` around one.
        data: a `datasets.Dataset` / `IterableDataset` or a list of examples, each a string or a dict with a text
            field (`"text"`, or `text_field`) or chat `"messages"` (rendered with the tokenizer's chat template); or a
            `torch.utils.data.DataLoader` yielding dicts with `input_ids` and `attention_mask`, used as given (split
            over ranks by batch unless it has a `DistributedSampler`).
        tokenizer (*optional*): the model's tokenizer; required unless `data` is a DataLoader.
        num_samples (`int`, *optional*, defaults to 512): how many (non-empty) examples to use; `None` for all.
        batch_size (`int`, *optional*, defaults to 8): examples per batch (the forward pass holds twice as many).
        max_length (`int`, *optional*, defaults to 256): texts are truncated to this many tokens.
        dropout (`float`, *optional*, defaults to 0.003): probability of the injected dropout on each head's output
            and on the FFN output (the authors' value).
        accumulate (`str`, *optional*, defaults to `"abs"`): `"abs"` sums |gradient| per batch (DAS paper),
            `"signed"` sums signed gradients (the authors' code).
        seed (`int`, *optional*, defaults to 0): seeds the dropout masks (together with each batch's tokens).
        parts (`Sequence[str]`, *optional*, defaults to all): which of `"heads"`, `"intermediate"`, `"output"`.
        text_field (`str`, *optional*): the field holding the text (or messages) of each example.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar (on rank 0).

    Returns:
        `Importance`: per-layer normalised importance; `metadata` records model, data, num_tokens, num_samples,
        dropout, accumulate and seed.

    Example:

    ```python
    >>> from cofitune_peft.estimation import estimate_importance
    >>> from cofitune_peft.models import load_smollm2
    >>> model, tokenizer = load_smollm2()
    >>> imp = estimate_importance(model, ["The capital of France is Paris."] * 4, tokenizer=tokenizer, progress=False)
    >>> tuple(imp.intermediate.shape)
    (30, 1536)
    ```
    """
    raw = _estimate_raw(
        model,
        data,
        tokenizer=tokenizer,
        num_samples=num_samples,
        batch_size=batch_size,
        max_length=max_length,
        dropout=dropout,
        accumulate=accumulate,
        seed=seed,
        parts=parts,
        text_field=text_field,
        progress=progress,
    )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    metadata = {
        "model": getattr(config, "_name_or_path", "") or getattr(config, "model_type", type(base).__name__),
        "data": _describe(data),
        "num_tokens": raw.num_tokens,
        "num_samples": raw.num_samples,
        "dropout": dropout,
        "accumulate": accumulate,
        "seed": seed,
    }
    logger.info("importance estimated on %d examples (%d tokens)", raw.num_samples, raw.num_tokens)
    return Importance(**raw.parts, normalized=False, metadata=metadata)


# ------------------------------------------------------------------------------------------------------------- CLI


def add_importance_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cofitune importance`."""
    parser.add_argument("--model", required=True, help="local transformers model folder, or 'smollm2' (embedded)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load (dequantised)")
    parser.add_argument("--data", required=True, help=".txt, .jsonl or .json file, or a datasets.save_to_disk folder")
    parser.add_argument("--out", required=True, help="importance file to write (safetensors)")
    parser.add_argument("--num-samples", type=int, default=512, help="examples to use (default 512)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (default 256)")
    parser.add_argument("--text-field", default=None, help="field with the text or messages (default text/messages)")
    parser.add_argument("--dropout", type=float, default=0.003, help="injected dropout (default 0.003)")
    parser.add_argument("--accumulate", choices=ACCUMULATE, default="abs", help="|grad| (DAS) or signed (authors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda if available)")
    parser.add_argument("--plot", default=None, help="also write a heatmap PNG here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _check_out_path(flag: str, path: str | None) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CoFiTuneError(f"`{flag}`: the folder {folder!r} of {path!r} does not exist; create it first.")


def _load_model(path: str, gguf_file: str | None, dtype: torch.dtype):
    if path == "smollm2":
        from .models import load_smollm2

        return load_smollm2(dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise CoFiTuneError(f"`--model`: no folder at {path!r}; pass a local model folder or 'smollm2'.")
    if gguf_file is not None and not os.path.isfile(os.path.join(path, gguf_file)):
        raise CoFiTuneError(f"`--gguf-file`: no file {gguf_file!r} in {path!r}.")
    if gguf_file is None and not os.path.isfile(os.path.join(path, "config.json")):
        raise CoFiTuneError(f"`--model`: {path!r} has no config.json; is it a transformers model folder?")
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    except (OSError, ValueError, TypeError) as err:
        raise CoFiTuneError(f"`--model`: could not load a tokenizer from {path!r} ({err}); save one there.") from err
    return model, tokenizer


def _read_data(path: str):
    """A list of texts / examples from a .txt, .jsonl or .json file, or a `datasets` folder."""
    if os.path.isdir(path):
        import datasets

        try:
            data = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as err:
            raise CoFiTuneError(f"`--data`: {path!r} is not a `datasets.save_to_disk` folder ({err}).") from err
        if isinstance(data, datasets.DatasetDict):
            split = "train" if "train" in data else next(iter(data))
            logger.info("`--data`: using split %r of %s", split, sorted(data))
            data = data[split]
        return data
    if not os.path.isfile(path):
        raise CoFiTuneError(f"`--data`: no file or folder at {path!r}.")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if ext == ".txt":
        blocks = re.split(r"\n\s*\n", content)
        docs = blocks if len(blocks) > 1 else content.splitlines()
        return [d.strip() for d in docs if d.strip()]
    if ext in (".jsonl", ".json"):
        try:
            rows = json.loads(content) if ext == ".json" else None
        except json.JSONDecodeError:
            rows = None  # a JSON-lines file named .json
        if rows is None:
            rows = []
            for number, line in enumerate(content.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise CoFiTuneError(f"`--data`: line {number} of {path!r} is not JSON ({err}).") from err
        if not isinstance(rows, list):
            raise CoFiTuneError(f"`--data`: {path!r} must hold a JSON list of examples, got a {type(rows).__name__}.")
        return rows
    raise CoFiTuneError(
        f"`--data`: unsupported file type {ext or '(none)'!r} of {path!r}; use .txt, .jsonl, .json or a "
        "`datasets.save_to_disk` folder."
    )


def importance_command(args: argparse.Namespace) -> int:
    """`cofitune importance`: estimate the importance and write it with `Importance.save` (and `--plot`)."""
    _check_out_path("--out", args.out)
    _check_out_path("--plot", args.plot)
    data = _read_data(args.data)
    if len(data) == 0:
        raise CoFiTuneError(f"`--data`: {args.data!r} holds no examples.")
    dtype = getattr(torch, args.dtype)
    model, tokenizer = _load_model(args.model, args.gguf_file, dtype)
    spec_for(model)  # a clear error for architectures without a known FFN layout, before any work
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    importance = estimate_importance(
        model,
        data,
        tokenizer=tokenizer,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        max_length=args.max_length,
        dropout=args.dropout,
        accumulate=args.accumulate,
        seed=args.seed,
        parts=args.parts,
        text_field=args.text_field,
        progress=not args.no_progress,
    )
    importance.metadata["data"] = os.path.abspath(args.data)
    importance.save(args.out)
    if args.plot:
        importance.plot(args.plot, title=f"importance of {os.path.basename(os.path.normpath(args.model))}")
    meta = importance.metadata
    print(f"wrote {args.out} ({meta['num_samples']} examples, {meta['num_tokens']} tokens)")
    return 0
