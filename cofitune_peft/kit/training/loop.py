"""A small, deterministic supervised fine-tuning loop that gives every method the identical budget.

The coarse search of CoFiTune (Zhang et al., ACL 2024 Findings, arXiv 2404.10306) compares many short fine-tunes, and
the project compares CoFiTune with full fine-tuning and LoRA. All of them go through `train_sft`: plain torch, the
same data order, batches, schedule and seed for any model (a plain `PreTrainedModel` for full fine-tuning, a LoRA or a
CoFiTune `PeftModel`). Training with TRL's `SFTTrainer` works too (see `CoFiTuneCallback`); this loop exists because it
is fast, has no moving parts, and is bit-for-bit repeatable on CPU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cofitune_peft import CoFiTuneError
from cofitune_peft.model_card import record_training_info
from cofitune_peft.utils import device_of

from .encoding import IGNORE_INDEX, collate, encode_example, pad_id_of

logger = logging.getLogger(__name__)

Encoded = tuple[list[int], list[int]]  # (token ids, labels) of one example


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1 over `warmup` steps (never 0), then a cosine decay towards 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_arguments(
    steps: int, learning_rate: float, batch_size: int, gradient_accumulation_steps: int, warmup_ratio: float
) -> None:
    """Raise one `CoFiTuneError` that lists every bad argument of `train_sft`."""
    problems = []
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        problems.append(f"`steps` must be a positive int, got {steps!r}.")
    if not learning_rate > 0:
        problems.append(f"`learning_rate` must be > 0, got {learning_rate!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if not isinstance(gradient_accumulation_steps, int) or gradient_accumulation_steps < 1:
        problems.append(f"`gradient_accumulation_steps` must be a positive int, got {gradient_accumulation_steps!r}.")
    elif isinstance(batch_size, int) and batch_size % gradient_accumulation_steps:
        problems.append(
            f"`gradient_accumulation_steps` ({gradient_accumulation_steps}) must divide `batch_size` ({batch_size}): "
            "`batch_size` is the whole step's batch, split into that many micro-batches."
        )
    if not 0 <= warmup_ratio < 1:
        problems.append(f"`warmup_ratio` must lie in [0, 1), got {warmup_ratio!r}.")
    if problems:
        raise CoFiTuneError("Invalid train_sft arguments:\n  - " + "\n  - ".join(problems))


def _encode_all(
    train_data: Iterable[Mapping[str, Any]], tokenizer, max_length: int, chat_template: bool | None
) -> list[Encoded]:
    """Every example encoded once; raises when there is nothing to take a loss on."""
    examples = list(train_data)
    if not examples:
        raise CoFiTuneError("`train_data` is empty; pass at least one example.")
    encoded = [encode_example(tokenizer, ex, max_length, chat_template) for ex in examples]
    if not any(any(x != IGNORE_INDEX for x in lab) for _, lab in encoded):
        raise CoFiTuneError(f"no example keeps a loss token within `max_length`={max_length}; raise `max_length`.")
    return encoded


OPTIMIZERS = ("adamw", "adamw8bit")


def _make_optimizer(optimizer, groups: list[dict], learning_rate: float, betas: tuple[float, float]):
    """`torch.optim.AdamW`, bitsandbytes' `AdamW8bit`, or `optimizer(groups, lr=..., betas=...)` for a callable."""
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)
    if optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as err:
            raise CoFiTuneError(
                f"`optimizer='adamw8bit'` needs bitsandbytes, which does not import ({type(err).__name__}: {err}); "
                "`pip install 'cofitune-peft[quantized]'`, or pass `optimizer='adamw'`."
            ) from err
        return bnb.optim.AdamW8bit(groups, lr=learning_rate, betas=betas)
    if callable(optimizer):
        return optimizer(groups, lr=learning_rate, betas=betas)
    raise CoFiTuneError(
        f"`optimizer` must be one of {OPTIMIZERS} or a callable `(param_groups, lr=, betas=) -> Optimizer` (e.g. "
        f"`functools.partial(CoFiTuneAdamW, rounding='stochastic')`), got {optimizer!r}."
    )


def _adamw_with_schedule(
    params: list[tuple[str, nn.Parameter]],
    learning_rate: float,
    betas: tuple[float, float],
    weight_decay: float,
    steps: int,
    warmup_ratio: float,
    optimizer="adamw",
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on matrices only (not on biases or norms), and a cosine schedule with warm-up."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = _make_optimizer(optimizer, [g for g in groups if g["params"]], learning_rate, betas)
    warmup = round(warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, steps, warmup))
    return optimizer, scheduler


class _DataOrder:
    """Example indices in an order that depends on the seed alone, reshuffled at each pass over the data."""

    def __init__(self, size: int, seed: int):
        self.size = size
        # A generator of its own: the order does not depend on the global RNG, nor on what the model draws from it.
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[int] = []

    def take(self, n: int) -> list[int]:
        while len(self.pending) < n:
            self.pending.extend(torch.randperm(self.size, generator=self.generator).tolist())
        taken = self.pending[:n]
        del self.pending[:n]
        return taken


def _forward_backward(
    model: nn.Module, chosen: list[Encoded], *, micro_batches: int, pad: int, device: torch.device
) -> tuple[float, int, int]:
    """Accumulate one optimizer step's gradients over `micro_batches`; `(loss, input tokens, loss tokens)`.

    Each micro-batch's summed token loss is divided by the loss tokens of the whole step, so the gradient does not
    depend on how the step is split.
    """
    loss_tokens = sum(sum(1 for x in lab[1:] if x != IGNORE_INDEX) for _, lab in chosen)
    micro = len(chosen) // micro_batches
    step_loss, tokens = 0.0, 0
    for m in range(micro_batches):
        batch = collate(chosen[m * micro : (m + 1) * micro], pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()  # [batch, time - 1, vocab]
        labels = batch["labels"][:, 1:]  # [batch, time - 1]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ) / max(loss_tokens, 1)
        loss.backward()
        step_loss += float(loss.detach())
        tokens += int(batch["attention_mask"].sum())
    return step_loss, tokens, loss_tokens


def _train(
    model: nn.Module,
    encoded: list[Encoded],
    params: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    *,
    tokenizer,
    steps: int,
    batch_size: int,
    micro_batches: int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """The optimizer steps, in train mode, and their statistics; the model is left in eval mode, also after an error."""
    order = _DataOrder(len(encoded), seed)
    device, pad = device_of(model), pad_id_of(tokenizer)
    torch.manual_seed(seed)  # dropout
    model.train()
    losses: list[float] = []
    tokens = loss_tokens = 0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", disable=not progress, leave=False)
    try:
        for _ in bar:
            chosen = [encoded[i] for i in order.take(batch_size)]
            step_loss, step_tokens, step_loss_tokens = _forward_backward(
                model, chosen, micro_batches=micro_batches, pad=pad, device=device
            )
            tokens += step_tokens
            loss_tokens += step_loss_tokens
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.4f}")
    finally:
        bar.close()
        model.eval()
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for _, p in params)
    logger.info(
        "trained %d steps in %.1f s: loss %.4f -> %.4f (%d trainable parameters)",
        steps,
        seconds,
        losses[0],
        losses[-1],
        trainable,
    )
    return {
        "final_loss": losses[-1],
        "mean_loss": sum(losses) / len(losses),
        "losses": losses,
        "seconds": seconds,
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "steps": steps,
        "trainable_parameters": trainable,
    }


def train_sft(
    model: nn.Module,
    train_data: Iterable[Mapping[str, Any]],
    *,
    tokenizer,
    steps: int,
    learning_rate: float,
    batch_size: int = 8,
    max_length: int = 256,
    seed: int = 0,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.03,
    progress: bool = True,
    gradient_accumulation_steps: int = 1,
    betas: tuple[float, float] = (0.9, 0.95),
    chat_template: bool | None = None,
    optimizer: str | Callable[..., torch.optim.Optimizer] = "adamw",
) -> dict[str, Any]:
    """Fine-tune `model` in place for `steps` optimizer steps of supervised fine-tuning.

    AdamW over the parameters that require grad (whatever the model is: full fine-tuning, LoRA, CoFiTune), a cosine
    schedule with linear warm-up, loss on completion tokens only for prompt/completion data. The data order comes from
    `seed` alone: example `i` of step `s` is the same for every model, so methods compare on identical batches.

    Args:
        model (`nn.Module`): a causal LM (or a `PeftModel` around one); trained in place, returned in eval mode.
        train_data (`Iterable[Mapping]`): examples with `prompt` and `completion` (loss on the completion),
            `messages` (loss on the last, assistant message) or `text` (loss on all tokens). A `datasets.Dataset`
            works. The data is cycled, reshuffled each pass, when `steps * batch_size` exceeds its size.
        tokenizer: the model's tokenizer; its chat template, if any, formats prompt/completion examples.
        steps (`int`): optimizer steps.
        learning_rate (`float`): peak learning rate.
        batch_size (`int`, *optional*, defaults to 8): examples per optimizer step. Unlike
            `TrainingArguments.per_device_train_batch_size`, this is the *whole* step's batch: it is split into
            `gradient_accumulation_steps` micro-batches, so changing the accumulation never changes the budget.
        max_length (`int`, *optional*, defaults to 256): tokens per example (the prompt is cut from its start).
        seed (`int`, *optional*, defaults to 0): data order and dropout.
        weight_decay (`float`, *optional*, defaults to 0.0): AdamW decoupled weight decay on matrices (not on biases
            or norms).
        warmup_ratio (`float`, *optional*, defaults to 0.03): fraction of `steps` (rounded) of linear warm-up.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar.
        gradient_accumulation_steps (`int`, *optional*, defaults to 1): micro-batches per step; must divide
            `batch_size`. The loss is normalised by the step's total number of loss tokens, so 1x8 equals 8x1.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.95)`): AdamW betas (the paper's).
        chat_template (`bool`, *optional*): `None` uses the tokenizer's chat template when it has one.
        optimizer (`str | Callable`, *optional*, defaults to `"adamw"`): `"adamw"` (`torch.optim.AdamW`),
            `"adamw8bit"` (bitsandbytes' `AdamW8bit`: 8-bit moments), or a callable called as
            `optimizer(param_groups, lr=learning_rate, betas=betas)`, e.g. `functools.partial(CoFiTuneAdamW,
            rounding="stochastic", fused_backward=True)`. A fused optimizer (`fused_backward=True`) steps during the
            backward pass and needs `gradient_accumulation_steps=1`.

    Returns:
        `dict`: `final_loss` (last step), `mean_loss`, `losses` (per step), `seconds`, `tokens` (non-padding input
        tokens), `loss_tokens`, `steps`, `trainable_parameters`.

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> from cofitune_peft import CoFiTuneConfig
    >>> from cofitune_peft.kit.training import train_sft
    >>> model = get_peft_model(base, CoFiTuneConfig(layers=(7, 15)))  # doctest: +SKIP
    >>> stats = train_sft(model, [{"prompt": "What is 2 + 3?", "completion": "5"}] * 8, tokenizer=tok,
    ...                   steps=10, learning_rate=1e-4)  # doctest: +SKIP
    ```
    """
    _check_arguments(steps, learning_rate, batch_size, gradient_accumulation_steps, warmup_ratio)
    encoded = _encode_all(train_data, tokenizer, max_length, chat_template)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise CoFiTuneError("the model has no parameter with `requires_grad=True`: nothing would train.")
    optimizer, scheduler = _adamw_with_schedule(
        params, learning_rate, betas, weight_decay, steps, warmup_ratio, optimizer
    )
    if getattr(optimizer, "fused_backward", False) and gradient_accumulation_steps > 1:
        optimizer.remove_hooks()
        raise CoFiTuneError(
            f"`gradient_accumulation_steps={gradient_accumulation_steps}` with a fused optimizer "
            "(`fused_backward=True`), which steps each parameter during the backward pass and so cannot accumulate "
            "gradients over micro-batches; use `gradient_accumulation_steps=1` (the step's batch is `batch_size` "
            "either way), or `fused_backward=False`."
        )
    stats = _train(
        model,
        encoded,
        params,
        optimizer,
        scheduler,
        tokenizer=tokenizer,
        steps=steps,
        batch_size=batch_size,
        micro_batches=gradient_accumulation_steps,
        seed=seed,
        progress=progress,
    )
    record_training_info(
        model,
        {
            "trainer": "cofitune-peft train_sft",
            "steps": steps,
            "batch_size": batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "learning_rate": float(learning_rate),
            "optimizer": f"{type(optimizer).__name__}, betas ({betas[0]:g}, {betas[1]:g})",
            "lr_scheduler": "cosine",
            "warmup": f"{warmup_ratio:g} of the steps ({round(warmup_ratio * steps)})",
            "weight_decay": float(weight_decay),
            "max_length": max_length,
            "precision": str(params[0][1].dtype).replace("torch.", ""),
            "seed": seed,
        },
    )
    return stats
