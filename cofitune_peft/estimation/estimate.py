"""`estimate_importance`: the gates' gradients of the KL proxy, accumulated over batches into an `Importance`.

The model's weights, modes and `requires_grad` flags are restored afterwards, and the global RNG is never drawn from:
dropout masks come from a generator seeded by `seed` and the batch's token ids, so a result does not depend on the
order of the batches (or on how batches are spread over ranks). Under `torch.distributed` the sums are all-reduced.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..architectures import PARTS, ModelLayout, model_layout, table
from ..errors import CoFiTuneError
from ..importance import Importance
from .attention import _ProbabilityDropout, attention_kernel, attention_kernel_set
from .batches import _check_data, _describe, _loader_batches, _text_batches
from .gates import _Gates, _kl_proxy, _lm_loss
from .recipes import OPTIONS, resolve_recipe

logger = logging.getLogger(__name__)

ACCUMULATE = ("abs", "signed")
SIGNALS = ("kl", "fisher")


@dataclass
class _Raw:
    parts: dict[str, torch.Tensor]  # part -> [layers, units] ([layers, experts, units]), sums / token count
    num_tokens: int
    num_samples: int
    options: dict[str, Any]  # the recipe's options as resolved (`recipes.OPTIONS`)
    units: dict[str, list[int]] | None = None  # real units per layer of parts whose width differs between layers


def _validate(
    num_samples, batch_size, max_length, dropout, accumulate, parts, signal, micro_batch_size=None
) -> tuple[str, ...]:
    problems = []
    if signal not in SIGNALS:
        problems.append(f"`signal` must be one of {SIGNALS}, got {signal!r}.")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        problems.append(f"`num_samples` must be a positive int or None, got {num_samples!r}.")
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"`{name}` must be a positive int, got {value!r}.")
    if micro_batch_size is not None and (
        not isinstance(micro_batch_size, int) or isinstance(micro_batch_size, bool) or micro_batch_size < 1
    ):
        problems.append(
            f"`micro_batch_size` must be a positive int or None (the whole batch in one pass), got "
            f"{micro_batch_size!r}."
        )
    if not isinstance(dropout, (int, float)) or not 0 < dropout < 1:
        problems.append(f"`dropout` must lie in (0, 1) (the paper uses 0.003), got {dropout!r}.")
    if accumulate not in ACCUMULATE:
        problems.append(f"`accumulate` must be one of {ACCUMULATE}, got {accumulate!r}.")
    if parts is not None:
        parts = (parts,) if isinstance(parts, str) else tuple(parts)
        if not parts or set(parts) - set(PARTS) or len(set(parts)) != len(parts):
            problems.append(
                f"`parts` must be None or a non-empty selection of {PARTS} without repeats, got {parts!r}."
            )
    if problems:
        raise CoFiTuneError(" ".join(problems))
    return None if parts is None else tuple(p for p in PARTS if p in parts)


def _layout_parts(layout: ModelLayout, parts: tuple[str, ...] | None) -> tuple[str, ...]:
    """The parts to estimate: those asked for (each must exist in the model), or every part the model has."""
    present = tuple(p for p in PARTS if layout.widths().get(p, 0) > 0)
    if parts is None:
        return present
    missing = [p for p in parts if p not in present]
    if missing:
        raise CoFiTuneError(
            f"`parts` asks for {missing}, which this model does not have (its layers have {list(present)}); drop them "
            "or pass `parts=None` for every part the model has."
        )
    return parts


@dataclass(frozen=True)
class _Settings:
    """The keyword arguments of `estimate_importance` that shape the raw scores (documented there). `None` for an
    option of `recipes.OPTIONS`: the recipe's value."""

    tokenizer: Any = None
    num_samples: int | None = 512
    batch_size: int = 8
    micro_batch_size: int | None = None
    max_length: int | None = None
    dropout: float = 0.003
    accumulate: str | None = None
    seed: int = 0
    parts: Sequence[str] | None = None
    text_field: str | None = None
    progress: bool = True
    signal: str = "kl"
    unit_map: dict | None = None
    layers_pattern: str | None = None
    recipe: str = "default"
    gate_grads: str | None = None
    padding: str | None = None
    padding_side: str | None = None
    kl_positions: str | None = None
    attention_dropout: str | None = None
    attn_implementation: str | None = None


def _estimate_raw(model: nn.Module, data, **settings) -> _Raw:
    """The raw (un-normalised) scores behind `estimate_importance`; the same keyword arguments (`_Settings`)."""
    from torch.utils.data import DataLoader

    opts = _Settings(**settings)
    given = {name: getattr(opts, name) for name in OPTIONS}
    opts = replace(opts, **resolve_recipe(opts.recipe, given, opts.signal, isinstance(data, DataLoader)))
    parts = _validate(
        opts.num_samples,
        opts.batch_size,
        opts.max_length,
        opts.dropout,
        opts.accumulate,
        opts.parts,
        opts.signal,
        opts.micro_batch_size,
    )
    is_loader = _check_data(data, opts.tokenizer)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kernel = opts.attn_implementation or attention_kernel(base)
    if (
        opts.signal == "kl"
        and opts.kl_positions == "all"
        and kernel != "eager"
        and (is_loader or opts.padding_side == "left")
    ):
        warnings.warn(
            f"`kl_positions='all'` under {kernel!r} attention: a left-padded position attends to no key, and what it "
            "computes depends on the kernel (SDPA may give it zeros, adding nothing to the KL; eager attention spreads "
            "it uniformly over every key, as the authors' code does). Pass `attn_implementation='eager'` to reproduce "
            "theirs.",
            stacklevel=3,
        )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    if is_loader:
        batches = _loader_batches(data, opts.num_samples, rank, world)
    else:
        batches = _text_batches(
            data,
            opts.tokenizer,
            opts.text_field,
            opts.num_samples,
            opts.batch_size,
            opts.max_length,
            rank,
            world,
            opts.padding,
            opts.padding_side,
        )
    total = None
    if hasattr(data, "__len__") and not is_loader:
        total = len(range(rank, min(len(data), opts.num_samples or len(data)), world))
    bar = _progress_bar(total, disable=not opts.progress or rank != 0)
    gates, sums, num_tokens, num_seen = _accumulate(model, batches, parts, opts, bar)
    flat_sums = torch.cat([s.detach().double().cpu().flatten() for s in sums])  # [total gate units]
    counts = torch.tensor([num_tokens, num_seen], dtype=torch.float64)
    if distributed:
        on = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
        packed = torch.cat([flat_sums, counts]).to(on)
        torch.distributed.all_reduce(packed)
        flat_sums, counts = packed[:-2].cpu(), packed[-2:].cpu()
    num_tokens, num_seen = int(counts[0]), int(counts[1])
    if num_tokens == 0:
        raise CoFiTuneError("`data` holds no non-empty text (0 tokens); pass at least one non-empty example.")
    out, offset, layers = {}, 0, gates.layout.num_layers
    for part, per_layer in gates.gates.items():
        shape = tuple(per_layer[0].shape)
        width = per_layer[0].numel()
        out[part] = (flat_sums[offset : offset + layers * width].view(layers, *shape) / num_tokens).float()
        offset += layers * width
    return _Raw(out, num_tokens, num_seen, {name: getattr(opts, name) for name in OPTIONS}, gates.units())


def _accumulate(model: nn.Module, batches, parts: tuple[str, ...], opts: _Settings, bar):
    """Run the gated model over `batches`; `(gates, per-gate gradient sums, tokens, examples)` of this rank.

    The model's weights, train/eval modes, `requires_grad` flags, attention kernel and RNG state are restored
    afterwards; a PeftModel is estimated on its base weights.
    """
    is_peft = hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")
    base = model.get_base_model() if is_peft else model
    layout = _estimation_layout(model, base, opts)
    parts = _layout_parts(layout, parts)
    if table.runs_layers_outside_autograd(base):
        raise CoFiTuneError(
            f"{type(base).__name__} has reversible layers, which backpropagate only in train mode, where the model's "
            "own dropout would add noise the KL proxy does not control; estimate_importance does not support it (the "
            "coarse level trains: pass `importance=None`)."
        )
    kl = opts.signal == "kl"
    on_probabilities = kl and opts.attention_dropout == "probabilities"
    kernel = opts.attn_implementation or attention_kernel(base)
    if on_probabilities and kernel != "eager":
        raise CoFiTuneError(
            f"`attention_dropout='probabilities'` needs eager attention, which computes the attention probabilities "
            f"as a tensor; this model runs {kernel!r}. Pass `attn_implementation='eager'` (switched for the estimate "
            "and back), or `attention_dropout='head_output'` (dropout on each head's output, any kernel)."
        )
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    device = model.get_input_embeddings().weight.device
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    gates = probabilities = None
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(attention_kernel_set(base, opts.attn_implementation))
            if is_peft:
                stack.enter_context(model.disable_adapter())
            model.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            gates = _Gates(base, layout, parts, float(opts.dropout) if kl else 0.0, not on_probabilities)
            if on_probabilities:
                probabilities = _ProbabilityDropout(base, layout, gates._drop)
            flat = gates.flat()
            sums = [torch.zeros_like(g) for g in flat]
            running = [torch.zeros_like(g) for g in flat] if opts.gate_grads == "never_zeroed" else None
            num_tokens = num_seen = 0
            for input_ids, attention_mask, n in batches:
                digest = zlib.crc32(input_ids.to(torch.int64).cpu().numpy().tobytes())
                gates.reseed((opts.seed * 0x9E3779B97F4A7C15 + digest) % 2**63)
                grads = _batch_gradients(model, base, input_ids.to(device), attention_mask.to(device), gates, opts)
                if probabilities is not None:
                    probabilities.check()
                if running is not None:  # the authors' `.grad` is never zeroed: add every gradient so far
                    for total, grad in zip(running, grads):
                        total += grad
                    grads = running
                for acc, grad in zip(sums, grads):
                    if not kl:
                        acc += grad.square()
                    else:
                        acc += grad.abs() if opts.accumulate == "abs" else grad
                num_tokens += int(attention_mask.sum())
                num_seen += n
                bar.update(n)
            bar.close()
    finally:
        for hooks in (gates, probabilities):
            if hooks is not None:
                hooks.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
    return gates, sums, num_tokens, num_seen


def _estimation_layout(model: nn.Module, base: nn.Module, opts: _Settings) -> ModelLayout:
    """The layout the gates go on: `unit_map`/`layers_pattern` when given, else those of the model's active CoFiTune
    adapter (so a model built with a `unit_map` is estimated with it), else read from the model."""
    unit_map, pattern = opts.unit_map, opts.layers_pattern
    if unit_map is None and pattern is None:
        for config in (getattr(model, "peft_config", None) or {}).values():
            if getattr(config, "unit_map", None) is not None:
                unit_map, pattern = config.unit_map, config.layers_pattern
                break
    return model_layout(base, unit_map, pattern)


def _batch_gradients(model, base, input_ids, attention_mask, gates: _Gates, opts: _Settings) -> list[torch.Tensor]:
    """This batch's gradient of the proxy with respect to each gate (`torch.autograd.grad`: nothing to zero); zeros
    for a gate no selected unit uses. With `opts.micro_batch_size`, the batch runs in slices of that many examples
    and their gradients are summed (the proxy is a sum over examples: the same batch gradient, with fresh dropout
    draws per slice), so only a slice's activations are held at once."""
    flat = gates.flat()
    step = opts.micro_batch_size or input_ids.shape[0]
    grads = None
    for start in range(0, input_ids.shape[0], step):
        ids, mask = input_ids[start : start + step], attention_mask[start : start + step]
        with parametrize.cached():
            if opts.signal == "kl":
                loss = _kl_proxy(model, ids, mask, all_positions=opts.kl_positions == "all")
            else:
                loss = _lm_loss(model, ids, mask)
        part = torch.autograd.grad(loss, flat, allow_unused=True)
        if grads is None:
            grads = list(part)
        else:
            grads = [g if p is None else (p if g is None else g + p) for g, p in zip(grads, part)]
    unreached = [i for i, (g, gate) in enumerate(zip(grads, flat)) if g is None and id(gate) in gates.used]
    if unreached:
        raise CoFiTuneError(
            f"some importance gates of this {type(base).__name__} were not reached in the forward pass "
            f"({len(unreached)} of {len(gates.used)}): its attention or FFN does not call the modules its "
            "layout names; describe the layers with `unit_map`."
        )
    return [torch.zeros_like(gate) if g is None else g for g, gate in zip(grads, flat)]


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
    micro_batch_size: int | None = None,
    max_length: int | None = None,
    dropout: float = 0.003,
    accumulate: str | None = None,
    seed: int = 0,
    parts: Sequence[str] | None = None,
    text_field: str | None = None,
    progress: bool = True,
    signal: str = "kl",
    normalization: str = "abs_tanh",
    unit_map: dict[str, str] | None = None,
    layers_pattern: str | None = None,
    recipe: str = "default",
    gate_grads: str | None = None,
    padding: str | None = None,
    padding_side: str | None = None,
    kl_positions: str | None = None,
    attention_dropout: str | None = None,
    attn_implementation: str | None = None,
) -> Importance:
    """Estimate the importance of attention heads, FFN intermediate units and outputs (and each expert's) with the KL
    proxy.

    Each batch runs twice with injected dropout `dropout`; the gradient of `KL(softmax(logits_2) ||
    softmax(logits_1))`, summed over non-padding tokens, with respect to all-ones gates on the units is accumulated
    over batches and divided by the number of tokens. The model's weights, train/eval modes and `requires_grad` flags
    are left as they were, and a `PeftModel` is estimated on its base weights (adapters disabled). Under
    `torch.distributed` each rank takes every `world_size`-th example and the sums are all-reduced.

    `recipe="authors"` reproduces the authors' code choice by choice (`RECIPES`; docs/method.md gives each choice's
    measured effect on the ranking): signed sums, gate gradients never zeroed between batches, every batch left-padded
    to 512 tokens with the KL summed over the padded positions too, the attention dropout on the attention
    probabilities, under eager attention. Each of these options, passed explicitly, wins over the recipe; left at
    `None` it takes the recipe's value.

    Args:
        model (`nn.Module`): a transformers causal LM, or a `peft.PeftModel` around one: any model whose layout
            `get_peft_model` reads (inferred, from the table of exceptions, or given as `unit_map`).
        data: a `datasets.Dataset` / `IterableDataset` or a list of examples, each a string or a dict with a text
            field (`"text"`, or `text_field`) or chat `"messages"` (rendered with the tokenizer's chat template); or a
            `torch.utils.data.DataLoader` yielding dicts with `input_ids` and `attention_mask`, used as given (split
            over ranks by batch unless it has a `DistributedSampler`).
        tokenizer (*optional*): the model's tokenizer; required unless `data` is a DataLoader.
        num_samples (`int`, *optional*, defaults to 512): how many (non-empty) examples to use; `None` for all.
        batch_size (`int`, *optional*, defaults to 8): examples per batch (the forward pass holds twice as many).
        micro_batch_size (`int`, *optional*): run each batch in slices of this many examples and sum their gradients
            before the batch's accumulation: a memory knob that leaves `accumulate` and `gate_grads` seeing one
            gradient per batch (the dropout draws differ, as with another seed). Peak activation memory falls about
            `batch_size / micro_batch_size`-fold; `None` runs the whole batch at once.
        max_length (`int`, *optional*): texts are truncated to this many tokens (and padded to it with
            `padding="max_length"`); the recipe's: 256, or 512 for `"authors"`.
        dropout (`float`, *optional*, defaults to 0.003): probability of the injected dropout on the attention (see
            `attention_dropout`) and on the FFN output (the authors' value).
        accumulate (`str`, *optional*): `"abs"` sums |gradient| per batch (DAS paper; the default recipe),
            `"signed"` sums signed gradients (the authors' code).
        seed (`int`, *optional*, defaults to 0): seeds the dropout masks (together with each batch's tokens).
        parts (`Sequence[str]`, *optional*, defaults to every part the model has): which of `"heads"`,
            `"intermediate"`, `"output"`, `"expert_intermediate"`, `"expert_output"`.
        text_field (`str`, *optional*): the field holding the text (or messages) of each example.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar (on rank 0).
        signal (`str`, *optional*, defaults to `"kl"`): `"kl"`, the KL robustness proxy above (the paper's); or
            `"fisher"`, the squared gradient of the language-model loss on `data` with respect to each gate, summed
            per batch (an empirical Fisher per unit, as EWC uses; no dropout is injected and `accumulate` is ignored).
        normalization (`str`, *optional*, defaults to `"abs_tanh"`): the per-layer normalisation of the raw scores,
            `"abs_tanh"` (the authors' `|tanh(z)|`) or `"one_sided"` (`tanh(max(z, 0))`), see `Importance`.
        unit_map (`dict[str, str]`, *optional*): describe the layers as `CoFiTuneConfig.unit_map` does (default: the
            active CoFiTune adapter's `unit_map` when `model` has one, else the layout read from the model).
        layers_pattern (`str`, *optional*): the decoder-layer list, as `CoFiTuneConfig.layers_pattern`.
        recipe (`str`, *optional*, defaults to `"default"`): `"default"` (this package's estimator) or `"authors"`
            (the authors' code): the values of the options below, and of `accumulate` and `max_length`, left `None`.
        gate_grads (`str`, *optional*): `"per_batch"` takes each batch's gate gradient once (default recipe);
            `"never_zeroed"` adds, after each batch, the sum of all gradients so far, as the authors' code does by
            never zeroing the gates' `.grad` (of T batches, batch b counts T - b + 1 times; the result depends on the
            order of the batches, and under `torch.distributed` each rank's running sum covers its own batches).
        padding (`str`, *optional*): `"longest"` pads each batch to its longest text (default recipe),
            `"max_length"` to `max_length` tokens (the authors'). Text data only.
        padding_side (`str`, *optional*): `"right"` (default recipe) or `"left"` (the authors'). Text data only.
        kl_positions (`str`, *optional*): `"tokens"` sums the KL over real tokens (default recipe), `"all"` over
            every position, padding included (the authors' code has no padding mask; the padded positions' outputs
            depend on the attention kernel: eager attention spreads them uniformly over all keys, as theirs does).
        attention_dropout (`str`, *optional*): where the attention dropout goes: `"head_output"`, each head's output
            (default recipe; any attention kernel), or `"probabilities"`, the attention probabilities (the authors';
            needs eager attention, see `attn_implementation`).
        attn_implementation (`str`, *optional*): the attention kernel to estimate with (`"eager"` for the authors'
            recipe), switched with the model's `set_attn_implementation` for the estimate and back afterwards; `None`
            in the default recipe: the model's own.

    Returns:
        `Importance`: per-layer normalised importance; `metadata` records model, data, num_tokens, num_samples,
        dropout, seed, signal, the recipe and every option it resolved (`accumulate`, `gate_grads`, `padding`,
        `padding_side`, `max_length`, `kl_positions`, `attention_dropout`, `attn_implementation`).

    Raises:
        `CoFiTuneError`: an option out of range; `recipe="authors"` or a KL-only option with `signal="fisher"`;
            `padding`/`padding_side` with a DataLoader; `attention_dropout="probabilities"` on a kernel other than
            eager, or on an attention that does not compute exactly one softmax; a kernel the model cannot switch to.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from cofitune_peft import estimate_importance
    >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> imp = estimate_importance(model, ["The capital of France is Paris."] * 4, tokenizer=tokenizer, progress=False)
    >>> tuple(imp.intermediate.shape)
    (30, 1536)
    >>> authors = estimate_importance(model, ["The capital of France is Paris."] * 4, tokenizer=tokenizer,
    ...                               recipe="authors", progress=False)
    >>> authors.metadata["attention_dropout"], authors.metadata["kl_positions"]
    ('probabilities', 'all')
    ```
    """
    raw = _estimate_raw(
        model,
        data,
        tokenizer=tokenizer,
        num_samples=num_samples,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        max_length=max_length,
        dropout=dropout,
        accumulate=accumulate,
        seed=seed,
        parts=parts,
        text_field=text_field,
        progress=progress,
        signal=signal,
        unit_map=unit_map,
        layers_pattern=layers_pattern,
        recipe=recipe,
        gate_grads=gate_grads,
        padding=padding,
        padding_side=padding_side,
        kl_positions=kl_positions,
        attention_dropout=attention_dropout,
        attn_implementation=attn_implementation,
    )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    metadata = {
        "model": getattr(config, "_name_or_path", "") or getattr(config, "model_type", type(base).__name__),
        "data": _describe(data),
        "num_tokens": raw.num_tokens,
        "num_samples": raw.num_samples,
        "dropout": dropout,
        "seed": seed,
        "signal": signal,
        "recipe": recipe,
        **raw.options,
    }
    metadata["attn_implementation"] = raw.options["attn_implementation"] or attention_kernel(base)  # the one used
    logger.info("importance estimated on %d examples (%d tokens)", raw.num_samples, raw.num_tokens)
    return Importance(**raw.parts, normalized=False, metadata=metadata, normalization=normalization, units=raw.units)
