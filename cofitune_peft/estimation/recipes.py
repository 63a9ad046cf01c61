"""Recipes of `estimate_importance`: the project's default estimator and the authors' code, choice by choice.

The authors of CoFiTune (arXiv 2404.10306) compute importance with DAS's KL proxy in code that makes several choices
this package does not make by default (docs/method.md lists each with its measured effect on the ranking):

- `accumulate`: they sum *signed* gate gradients; the default sums |gradient| per batch (the DAS paper's definition).
- `gate_grads`: they never zero the gates' `.grad` between batches, so after batch t they add the sum of all gradients
  so far (batch b counts T - b + 1 times over T batches); the default takes each batch's gradient once.
- `padding` / `padding_side` / `max_length`: they left-pad every batch to a fixed 512 tokens; the default right-pads to
  the batch's longest text (256 tokens at most).
- `kl_positions`: their KL has no padding mask, so padded positions count too; the default sums over real tokens.
- `attention_dropout`: they inject the attention dropout on the attention *probabilities* (eager LLaMA code); the
  default puts it on each head's output, which every attention kernel (SDPA, flash) exposes.
- `attn_implementation`: their LLaMA code is eager attention, which is also what makes padded positions attend
  uniformly to every key as theirs do; the default leaves the model's kernel as it is.

`recipe="authors"` sets all of them to the authors' choices; any option passed explicitly wins over the recipe.
"""

from __future__ import annotations

from typing import Any

from ..errors import CoFiTuneError

GATE_GRADS = ("per_batch", "never_zeroed")
PADDING = ("longest", "max_length")
PADDING_SIDES = ("right", "left")
KL_POSITIONS = ("tokens", "all")
ATTENTION_DROPOUT = ("head_output", "probabilities")

#: The options each recipe sets (`None` for `attn_implementation`: the model's own kernel).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {
        "accumulate": "abs",
        "gate_grads": "per_batch",
        "padding": "longest",
        "padding_side": "right",
        "max_length": 256,
        "kl_positions": "tokens",
        "attention_dropout": "head_output",
        "attn_implementation": None,
    },
    "authors": {
        "accumulate": "signed",
        "gate_grads": "never_zeroed",
        "padding": "max_length",
        "padding_side": "left",
        "max_length": 512,
        "kl_positions": "all",
        "attention_dropout": "probabilities",
        "attn_implementation": "eager",
    },
}
OPTIONS = tuple(RECIPES["default"])
_CHOICES = {
    "gate_grads": GATE_GRADS,
    "padding": PADDING,
    "padding_side": PADDING_SIDES,
    "kl_positions": KL_POSITIONS,
    "attention_dropout": ATTENTION_DROPOUT,
}
# Options that only mean something for the KL proxy, with the value that is neutral for the Fisher signal.
_KL_ONLY = {"gate_grads": "per_batch", "kl_positions": "tokens", "attention_dropout": "head_output"}


def resolve_recipe(recipe: str, given: dict[str, Any], signal: str, is_loader: bool) -> dict[str, Any]:
    """The recipe's options with those `given` (not None) in their place, checked; every problem in one error."""
    if recipe not in RECIPES:
        raise CoFiTuneError(f"`recipe` must be one of {tuple(RECIPES)}, got {recipe!r}.")
    explicit = {k: v for k, v in given.items() if v is not None}
    problems = []
    for name, value in explicit.items():
        if name in _CHOICES and value not in _CHOICES[name]:
            problems.append(f"`{name}` must be one of {_CHOICES[name]}, got {value!r}.")
    if "attn_implementation" in explicit and not isinstance(explicit["attn_implementation"], str):
        problems.append(
            f"`attn_implementation` must be a string such as 'eager', got {explicit['attn_implementation']!r}."
        )
    if signal == "fisher":
        if recipe == "authors":
            problems.append("`recipe='authors'` is the authors' KL proxy; it does not combine with `signal='fisher'`.")
        problems += [
            f"`{name}={explicit[name]!r}` applies to the KL proxy only; leave it out with `signal='fisher'`."
            for name, neutral in _KL_ONLY.items()
            if explicit.get(name, neutral) != neutral
        ]
    if is_loader:
        problems += [
            f"`{name}` applies to text data; a DataLoader's batches are used as they come (pad them in its collator)."
            for name in ("padding", "padding_side")
            if name in explicit
        ]
    if problems:
        raise CoFiTuneError(" ".join(problems))
    return {**RECIPES[recipe], **explicit}
