"""The batched model passes the evaluators share: greedy answers to prompts, and the log-likelihood of options.

Prompts are rendered with the tokenizer's chat template when it has one (`chat_template=None`); the model is put in
eval mode for the pass and given back in the mode it came in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from cofitune_peft import CoFiTuneError
from cofitune_peft.utils import device_of

from ..training.encoding import IGNORE_INDEX, collate, has_chat_template, pad_id_of, render_prompt


def _prompt_ids(tokenizer, prompt, chat_template: bool | None) -> list[int]:
    use_template = has_chat_template(tokenizer) if chat_template is None else chat_template
    text = render_prompt(tokenizer, prompt, chat_template=use_template)
    return tokenizer(text, add_special_tokens=not use_template)["input_ids"]


def _check_tokenizer(tokenizer):
    if tokenizer is None:
        raise CoFiTuneError("a `tokenizer` is needed: pass it to the evaluator or to the call.")
    return tokenizer


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """Put `model` in eval mode for the block, and give it back in the mode it came in (even on an error)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    progress: bool = True,
    chat_template: bool | None = None,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers to `prompts`, batched with left padding; the decoded new text of each."""
    device, pad = device_of(model), pad_id_of(tokenizer)
    out: list[str] = []
    encoded = [_prompt_ids(tokenizer, p, chat_template) for p in prompts]
    with eval_mode(model):
        for start in tqdm(range(0, len(encoded), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = [(ids, ids) for ids in encoded[start : start + batch_size]]
            batch = collate(chunk, pad, left=True)
            generated = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            new = generated[:, batch["input_ids"].shape[1] :]  # [batch, new tokens]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


@torch.no_grad()
def option_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    options: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    length_normalize: bool = False,
    progress: bool = True,
    chat_template: bool | None = None,
    desc: str = "options",
) -> list[list[float]]:
    """Log-likelihood of each option as the continuation of its prompt (summed, or per token if `length_normalize`).

    Without a chat template a space separates prompt and option unless either side already has one.
    """
    use_template = has_chat_template(tokenizer) if chat_template is None else chat_template
    device, pad = device_of(model), pad_id_of(tokenizer)
    pairs: list[tuple[list[int], list[int]]] = []
    for prompt, opts in zip(prompts, options):
        prompt_ids = _prompt_ids(tokenizer, prompt, use_template)
        prompt_text = prompt if isinstance(prompt, str) else ""
        for option in opts:
            text = str(option)
            if not use_template and prompt_text and not prompt_text[-1].isspace() and not text[:1].isspace():
                text = " " + text
            option_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            pairs.append((prompt_ids + option_ids, [IGNORE_INDEX] * len(prompt_ids) + option_ids))
    scores: list[float] = []
    with eval_mode(model):
        for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, leave=False):
            batch = collate(pairs[start : start + batch_size], pad)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [batch, time - 1, vocab]
            labels = batch["labels"][:, 1:].to(device)  # [batch, time - 1]
            keep = labels != IGNORE_INDEX
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep  # [batch, time - 1]
            total = picked.sum(-1)
            if length_normalize:
                total = total / keep.sum(-1).clamp(min=1)
            scores.extend(total.tolist())
    out, i = [], 0
    for opts in options:
        out.append(scores[i : i + len(opts)])
        i += len(opts)
    return out
