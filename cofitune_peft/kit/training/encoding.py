"""From examples to tensors: chat rendering, token ids with loss labels, padding.

Training and evaluation share these, so a prompt is rendered and tokenised the same way when a model learns from it
and when it is scored on it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

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
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)  # [batch, time]
    mask = torch.zeros((len(encoded), width), dtype=torch.long)  # [batch, time]
    for i, (ids, lab) in enumerate(encoded):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        labels[i, span] = torch.tensor(lab, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pad_id_of(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)
