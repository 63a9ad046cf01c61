"""Training wrappers: a method that changes how the model trains, not what it is, wraps the model for `train_sft`.

`train_sft` calls `model(input_ids=..., attention_mask=...).logits` and steps an AdamW over the parameters that require
grad; it has no hook for extra loss terms or steps. A `TrainingWrapper` is an `nn.Module` around the model that adds
what its method needs (a penalty's gradient, a decay after each optimizer step) and gives the trained model back with
`unwrap()`, which the comparison calls before scoring. `PenaltyToBase` is the L1/L2-to-base baseline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cofitune_peft import CoFiTuneError


class TrainingWrapper(nn.Module):
    """Base of the models a method builder may return instead of the model itself: `unwrap()` gives the trained
    model back (and undoes whatever the wrapper installed), `forward` passes through."""

    model: nn.Module

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def unwrap(self) -> nn.Module:
        """The trained model itself (for evaluation and saving)."""
        return self.model


class _InjectGradient(torch.autograd.Function):
    """Identity on `logits`; in backward, `penalty` receives gradient `scale`, so its parameters get `scale * dR/dW`."""

    @staticmethod
    def forward(ctx, logits, penalty, scale):
        ctx.scale = scale
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_full((), ctx.scale), None


class PenaltyToBase(TrainingWrapper):
    """Full fine-tuning with an L1 or L2 penalty toward the base weights, as a wrapper around the model's forward.

    `train_sft` computes its loss from `logits` and has no hook for extra loss terms, so the penalty enters through
    the logits: they pass unchanged, and the backward pass adds `d(penalty)/dW` to every weight's gradient, exactly as
    if `penalty` had been added to the loss (spread over `micro_batches` micro-batches, once per optimizer step). With
    `target="loss"` the penalty is added to the returned `loss` instead, for trainers that use it (HF `Trainer`).

    Args:
        model (`nn.Module`): the model; its current weights are the anchor `W0`.
        kind (`str`): `"l1"` (`strength * sum |W - W0|`) or `"l2"` (`strength / 2 * sum (W - W0)^2`).
        strength (`float`): the penalty's weight.
        micro_batches (`int`, *optional*, defaults to 1): forward passes per optimizer step.
        target (`str`, *optional*, defaults to `"logits"`): `"logits"` or `"loss"`.
        include (`Callable[[str], bool]`, *optional*): which parameters (by name) the penalty covers; all of them
            train either way. `None`: every parameter.
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        strength: float,
        micro_batches: int = 1,
        target: str = "logits",
        include: Callable[[str], bool] | None = None,
    ):
        super().__init__()
        problems = []
        if kind not in ("l1", "l2"):
            problems.append(f"`kind` must be 'l1' or 'l2', got {kind!r}.")
        if not strength >= 0:
            problems.append(f"`strength` must be >= 0, got {strength!r}.")
        if target not in ("logits", "loss"):
            problems.append(f"`target` must be 'logits' or 'loss', got {target!r}.")
        if not isinstance(micro_batches, int) or micro_batches < 1:
            problems.append(f"`micro_batches` must be a positive int, got {micro_batches!r}.")
        if problems:
            raise CoFiTuneError("Invalid PenaltyToBase arguments:\n  - " + "\n  - ".join(problems))
        for p in model.parameters():
            p.requires_grad_(True)
        self.model = model
        self.kind, self.strength, self.micro_batches, self.target = kind, float(strength), micro_batches, target
        # Plain tensors, not buffers: the anchor is neither trained nor saved with the model.
        self._anchor = {
            n: p.detach().clone() for n, p in self.model.named_parameters() if include is None or include(n)
        }
        if not self._anchor:
            raise CoFiTuneError("`include` selects no parameter: the penalty would cover nothing.")
        self.last_penalty = 0.0

    def penalty(self) -> torch.Tensor:
        terms = []
        for name, p in self.model.named_parameters():
            if name not in self._anchor:
                continue
            delta = p - self._anchor[name].to(p.device, p.dtype)
            terms.append(delta.abs().sum() if self.kind == "l1" else 0.5 * delta.pow(2).sum())
        return self.strength * torch.stack(terms).sum()

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if not (self.training and torch.is_grad_enabled() and self.strength > 0):
            return out
        penalty = self.penalty()
        self.last_penalty = float(penalty.detach())
        if self.target == "loss":
            if getattr(out, "loss", None) is None:
                raise CoFiTuneError("`target='loss'` needs a model output with `loss` (pass `labels`).")
            out.loss = out.loss + penalty / self.micro_batches
        else:
            out.logits = _InjectGradient.apply(out.logits, penalty, 1.0 / self.micro_batches)
        return out

    def unwrap(self) -> nn.Module:
        """The trained model itself (for evaluation and saving)."""
        return self.model
