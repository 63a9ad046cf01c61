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
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cofitune_peft import CoFiTuneError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_FALLBACK_LOGGED: list[bool] = []  # log the chat-template fallback once per process, not once per example


def has_chat_template(tokenizer) -> bool:
    """Whether `tokenizer` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: str | list[dict], chat_template: bool | None = None) -> str:
    """The text a model sees before its answer: `prompt` in the chat template (with the generation prompt) if any.

    Args:
        tokenizer: a transformers tokenizer.
        prompt (`str | list[dict]`): a user message, or a list of chat messages.
        chat_template (`bool`, *optional*): `None` uses the tokenizer's chat template when it has one.
    """
    use_template = has_chat_template(tokenizer) if chat_template is None else chat_template
    if not use_template:
        if isinstance(prompt, list):
            return "\n".join(m["content"] for m in prompt)
        return prompt
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _split_chat(tokenizer, prompt: str | list[dict], completion: str) -> tuple[str, str]:
    """Prompt and completion as the chat template renders them (the completion keeps its end-of-turn marker)."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}], tokenize=False)
    if full.startswith(prompt_text):
        return prompt_text, full[len(prompt_text) :]
    # A template that rewrites earlier turns when an answer follows: fall back to appending the answer.
    if not _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.append(True)
        logger.info(
            "the chat template does not extend the prompt with the answer; appending the answer to the prompt."
        )
    return prompt_text, completion + (tokenizer.eos_token or "")


def encode_example(
    tokenizer, example: Mapping[str, Any], max_length: int, chat_template: bool | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one training example (labels are `-100` where no loss is taken).

    `{"prompt", "completion"}` examples take the loss on the completion only; `{"messages": [...]}` on the last
    (assistant) message; `{"text"}` on every token. With a chat template, prompt and completion are rendered as a user
    and an assistant turn (the completion keeps the template's end-of-turn marker); without one, prompt and completion
    are joined as given (put any separator in the data) and the tokenizer's EOS token ends the completion. Over
    `max_length`, the prompt loses its beginning first, so the completion stays whole.
    """
    use_template = has_chat_template(tokenizer) if chat_template is None else chat_template
    if "messages" in example:
        messages = list(example["messages"])
        if not messages or messages[-1].get("role") != "assistant":
            raise CoFiTuneError("a `messages` example must end with an assistant message, the one the loss is on.")
        example = {"prompt": messages[:-1], "completion": messages[-1]["content"]}
    if "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        if use_template:
            prompt_text, completion_text = _split_chat(tokenizer, prompt, completion)
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        else:
            prompt_text = render_prompt(tokenizer, prompt, chat_template=False)
            prompt_ids = tokenizer(prompt_text)["input_ids"]
            completion_text = completion
        completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
        if not use_template and tokenizer.eos_token_id is not None:
            completion_ids = [*completion_ids, tokenizer.eos_token_id]
        completion_ids = completion_ids[:max_length]
        keep = max_length - len(completion_ids)
        prompt_ids = prompt_ids[len(prompt_ids) - keep :] if keep > 0 else []
        return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    if "text" in example:
        ids = tokenizer(example["text"])["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
        ids = ids[:max_length]
        return ids, list(ids)
    raise CoFiTuneError(
        f"each training example needs `prompt` and `completion`, `messages`, or `text`; got keys {sorted(example)}."
    )


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad `(ids, labels)` pairs into `input_ids`, `attention_mask`, `labels` tensors (right padding by default)."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # [batch, time]
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(encoded):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        labels[i, span] = torch.tensor(lab, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1 over `warmup` steps (never 0), then a cosine decay towards 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


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
    examples = list(train_data)
    if not examples:
        raise CoFiTuneError("`train_data` is empty; pass at least one example.")
    encoded = [encode_example(tokenizer, ex, max_length, chat_template) for ex in examples]
    if not any(any(x != IGNORE_INDEX for x in lab) for _, lab in encoded):
        raise CoFiTuneError(f"no example keeps a loss token within `max_length`={max_length}; raise `max_length`.")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise CoFiTuneError("the model has no parameter with `requires_grad=True`: nothing would train.")
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas)
    warmup = round(warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, steps, warmup))

    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def next_indices(n: int) -> list[int]:
        while len(order) < n:
            order.extend(torch.randperm(len(encoded), generator=generator).tolist())
        taken = order[:n]
        del order[:n]
        return taken

    device = _device_of(model)
    pad = pad_id_of(tokenizer)
    micro = batch_size // gradient_accumulation_steps
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    tokens = loss_tokens = 0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", disable=not progress, leave=False)
    try:
        for _ in bar:
            chosen = [encoded[i] for i in next_indices(batch_size)]
            step_tokens = sum(sum(1 for x in lab[1:] if x != IGNORE_INDEX) for _, lab in chosen)
            step_loss = 0.0
            for m in range(gradient_accumulation_steps):
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
                ) / max(step_tokens, 1)
                loss.backward()
                step_loss += float(loss.detach())
                tokens += int(batch["attention_mask"].sum())
            loss_tokens += step_tokens
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.4f}")
    finally:
        bar.close()
        model.eval()
    seconds = time.perf_counter() - start
    stats = {
        "final_loss": losses[-1],
        "mean_loss": sum(losses) / len(losses),
        "losses": losses,
        "seconds": seconds,
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "steps": steps,
        "trainable_parameters": sum(p.numel() for _, p in params),
    }
    logger.info(
        "trained %d steps in %.1f s: loss %.4f -> %.4f (%d trainable parameters)",
        steps,
        seconds,
        losses[0],
        losses[-1],
        stats["trainable_parameters"],
    )
    return stats
