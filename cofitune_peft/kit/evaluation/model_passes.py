"""The batched model passes the evaluators share: greedy answers to prompts, and the log-likelihood of options.

Prompts are rendered with the tokenizer's chat template when it has one (`chat_template=None`); the model is put in
eval mode for the pass and given back in the mode it came in.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from cofitune_peft import CoFiTuneError
from cofitune_peft.utils import device_of

from ..training.encoding import collate, has_chat_template, pad_id_of, render_prompt


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

    Without a chat template a space separates prompt and option unless either side already has one. Each prompt runs
    through the model once; its options continue from the prompt's key/value cache (the prompt is most of the tokens,
    so this costs a fraction of scoring every (prompt, option) pair whole). `batch_size` is kept for compatibility:
    a prompt and its options form one pass.
    """
    use_template = has_chat_template(tokenizer) if chat_template is None else chat_template
    device, pad = device_of(model), pad_id_of(tokenizer)
    out: list[list[float]] = []
    with eval_mode(model):
        for prompt, opts in tqdm(list(zip(prompts, options)), desc=desc, disable=not progress, leave=False):
            prompt_ids = _prompt_ids(tokenizer, prompt, use_template)
            prompt_text = prompt if isinstance(prompt, str) else ""
            encoded = []
            for option in opts:
                text = str(option)
                if not use_template and prompt_text and not prompt_text[-1].isspace() and not text[:1].isspace():
                    text = " " + text
                encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            first = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
            cache = first["cache"] if "cache" in first else first["past_key_values"]
            head = torch.log_softmax(first.logits[0, -1].float(), dim=-1)  # [vocab]: each option's first token
            scores = [float(head[ids[0]]) if ids else 0.0 for ids in encoded]
            longer = [i for i, ids in enumerate(encoded) if len(ids) > 1]
            if longer:
                rest = _continuations(model, cache, len(prompt_ids), [encoded[i] for i in longer], pad)
                for i, value in zip(longer, rest):
                    scores[i] += value
            if length_normalize:
                scores = [v / max(len(ids), 1) for v, ids in zip(scores, encoded)]
            out.append(scores)
    return out


def _continuations(model, cache, prompt_length: int, options: list[list[int]], pad: int) -> list[float]:
    """Summed log-probability of each option's tokens after its first, continuing the prompt held in `cache` (which
    this consumes): the options run as one right-padded batch over the prompt's cache repeated."""
    device = device_of(model)
    cache.batch_repeat_interleave(len(options))
    width = max(len(ids) - 1 for ids in options)
    ids = torch.full((len(options), width), pad, dtype=torch.long)  # [options, width]
    mask = torch.zeros((len(options), prompt_length + width), dtype=torch.long)  # [options, prompt + width]
    mask[:, :prompt_length] = 1
    for row, option in enumerate(options):
        ids[row, : len(option) - 1] = torch.tensor(option[:-1])
        mask[row, prompt_length : prompt_length + len(option) - 1] = 1
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": True}
    inputs[_cache_argument(model)] = cache
    logits = model(**inputs).logits
    logp = torch.log_softmax(logits.float(), dim=-1)  # [options, width, vocab]
    return [
        float(logp[row, torch.arange(len(option) - 1), torch.tensor(option[1:])].sum())
        for row, option in enumerate(options)
    ]


def _cache_argument(model) -> str:
    """The forward argument that takes a key/value cache: `cache` (recent transformers) or `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
