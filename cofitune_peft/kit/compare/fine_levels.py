"""Fine levels that are not a learning rate, and the practitioners' replay baseline, as registry methods.

Every soft-mask variant of CoFiTune (arXiv 2404.10306) the comparison measured moved along the coarse level's curve:
scaling a row's step is a per-row learning rate. These restrain the trained weights differently:

- `cofitune_pull` (`ImportancePull`): the window trains at the full rate, and after every optimizer step each delta
  row decays toward zero (toward the base weight) by `lr * pull_strength * I`, with `I` the importance of the unit
  the row feeds (EWC-like: a quadratic pull whose stiffness is the unit's importance, applied decoupled, in update
  space, as AdamW applies weight decay). A row moves freely at first; an important row settles where its gradient and
  the pull balance (about `1 / (pull_strength * I)` per weight), whatever the learning rate.
- `cofitune_restrained` (`restrained_importance`): the window's FFN at the full rate, every other module of every
  layer (attention everywhere, the FFN outside the window) under the soft mask at `restraint_rate` times the rate:
  the window combined with the whole-model soft mask (`vsoftmask`) at a lower rate outside it.
- `cofitune_l2out`: every weight trains, the window's FFN freely and the rest under an L2 pull toward the base weights
  (`PenaltyToBase` restricted to the weights outside the window): the L2-to-base baseline with CoFiTune's window free.

Replay (`ReplayMix`): general examples (`MethodSettings.replay_examples`) mixed into the training data at a fraction,
for full fine-tuning, LoRA and CoFiTune's coarse level; each method over its own learning-rate grid.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from cofitune_peft import CoFiTuneError, Importance

from .methods import (
    _ADAPTER_LRS,
    _FULL_LRS,
    Method,
    MethodSettings,
    _cofitune,
    _need_importance,
    _num_layers,
    build_cofitune,
    build_full,
    build_lora,
    register_method,
)
from .penalties import PenaltyToBase, TrainingWrapper


def _window(model: nn.Module, settings: MethodSettings) -> tuple[int, int]:
    from cofitune_peft.plan import default_window

    return tuple(settings.layers) if settings.layers else default_window(_num_layers(model))


class ImportancePull(TrainingWrapper):
    """A CoFiTune model whose deltas decay toward zero after every optimizer step, row by row, by importance.

    After each step of any optimizer that holds the deltas, every row (or column, for modules masked by column) of
    every delta is multiplied by `max(0, 1 - lr * strength * I)`, with `lr` the step's learning rate (its group's,
    schedule included) and `I` the importance of the unit the row feeds (`1 - scale` of the adapter's soft-mask scales,
    whatever its `softmask_mode`). Like AdamW's decoupled weight decay, per row: `W - W0 = Delta` is pulled to 0.

    The decay runs from a global optimizer step hook (`register_optimizer_step_post_hook`), so
    it works under `train_sft` and under HF `Trainer` alike; `unwrap()` removes the hook.

    Args:
        model: a CoFiTune `PeftModel` built with an importance (its soft-mask scales are `1 - I`).
        strength (`float`): the decay per unit of learning rate and of importance (>= 0).
    """

    def __init__(self, model: nn.Module, strength: float):
        super().__init__()
        tuner = getattr(model, "base_model", None)
        if not hasattr(tuner, "cofitune_layers"):
            raise CoFiTuneError(f"`ImportancePull` needs a CoFiTune model, got {type(model).__name__}.")
        if not (isinstance(strength, (int, float)) and strength >= 0):
            raise CoFiTuneError(f"`strength` must be a number >= 0, got {strength!r}.")
        self.model = model
        self.strength = float(strength)
        self._importance: dict[int, torch.Tensor] = {}  # id(delta) -> I broadcast to the delta's shape
        self._deltas: dict[int, torch.Tensor] = {}
        for _, layer in tuner.cofitune_layers():
            for name, delta in layer.cofitune_delta.items():
                importance = (1.0 - layer.cofitune_scale[name]).clamp(0.0, 1.0).to(delta.weight.dtype)  # [size]
                shaped = importance.unsqueeze(1) if layer.cofitune_axis[name] == 0 else importance.unsqueeze(0)
                self._importance[id(delta.weight)] = shaped
                self._deltas[id(delta.weight)] = delta.weight
        if not self._deltas:
            raise CoFiTuneError("the CoFiTune model has no delta to pull; build it with a window and an importance.")
        ref = weakref.ref(self)

        def after_step(optimizer, args, kwargs):
            owner = ref()
            if owner is not None:
                owner.pull(optimizer)

        self._handle = register_optimizer_step_post_hook(after_step)

    @torch.no_grad()
    def pull(self, optimizer: torch.optim.Optimizer) -> None:
        """Decay this model's deltas held by `optimizer`, each at its group's learning rate."""
        for group in optimizer.param_groups:
            rate = float(group["lr"]) * self.strength
            for p in group["params"]:
                importance = self._importance.get(id(p))
                if importance is not None and p is self._deltas[id(p)]:
                    p.mul_((1.0 - rate * importance.to(p.device)).clamp_(min=0.0))

    def unwrap(self) -> nn.Module:
        """The trained CoFiTune model; the step hook is removed."""
        self._handle.remove()
        return self.model


def build_cofitune_pull(model: nn.Module, settings: MethodSettings) -> nn.Module:
    importance = _need_importance(settings, "cofitune_pull")
    built = _cofitune(model, settings, importance=importance, softmask_mode="none")
    return ImportancePull(built, settings.pull_strength)


def restrained_importance(importance: Importance, window: tuple[int, int], rate: float) -> Importance:
    """The importance whose soft mask trains the window's FFN at the full rate and everything else at `rate * (1 - I)`.

    The mask scales a row by `1 - I'`: inside the window, `I' = 0` for the FFN's units (intermediate and output: the
    up, gate and down projections, whose rows feed them); everywhere else (and for the attention heads of every layer)
    `I' = 1 - rate * (1 - I)`.
    """
    if not 0.0 <= rate <= 1.0:
        raise CoFiTuneError(f"`restraint_rate` must lie in [0, 1] (the step outside the window), got {rate!r}.")
    a, b = window
    parts = {}
    for part, values in importance.parts().items():
        out = 1.0 - rate * (1.0 - values.float())  # [layers, units]
        if part in ("intermediate", "output"):
            out[a:b] = 0.0
        parts[part] = out
    metadata = {**importance.metadata, "restrained_window": f"{a}:{b}", "restraint_rate": repr(float(rate))}
    return Importance(**parts, normalized=True, metadata=metadata)


def build_cofitune_restrained(model: nn.Module, settings: MethodSettings) -> nn.Module:
    importance = _need_importance(settings, "cofitune_restrained")
    crafted = restrained_importance(importance, _window(model, settings), settings.restraint_rate)
    return _cofitune(model, settings, layers=(0, _num_layers(model)), target_modules="all", importance=crafted)


def build_cofitune_l2out(model: nn.Module, settings: MethodSettings) -> nn.Module:
    from cofitune_peft import CoFiTuneConfig
    from cofitune_peft.plan import build_plan

    # the modules CoFiTune's window would train (FFN with its gate), read from CoFiTune's own plan
    plan = build_plan(model, CoFiTuneConfig(layers=_window(model, settings), target_modules="ffn+gate"))
    free = {f"{key}." for key in plan.entries}

    def restrained(name: str) -> bool:
        return not any(name.startswith(prefix) for prefix in free)

    strength = settings.penalty_strengths.get("l2", 1.0)
    return PenaltyToBase(model, "l2", strength, settings.micro_batches, include=restrained)


@dataclass(frozen=True)
class ReplayMix:
    """Training data with replay: the task's examples plus `MethodSettings.replay_examples`, cycled, so that replay
    makes up `fraction` of the set (and, in expectation, of every batch; `train_sft` shuffles the whole set)."""

    fraction: float

    def __post_init__(self):
        if not 0.0 < self.fraction < 1.0:
            raise CoFiTuneError(f"`fraction` must lie in (0, 1), got {self.fraction!r}.")

    def __call__(self, train: Sequence[Mapping[str, Any]], settings: MethodSettings) -> list[dict]:
        pool = [dict(x) for x in settings.replay_examples]
        if not pool:
            raise CoFiTuneError(
                "replay methods need `MethodSettings.replay_examples` (general examples to mix in); the comparison's "
                "presets make them with `task_replay`."
            )
        count = round(self.fraction / (1.0 - self.fraction) * len(train))
        return [*(dict(x) for x in train), *(pool[i % len(pool)] for i in range(count))]


for _m in (
    Method("cofitune_pull", build_cofitune_pull, _ADAPTER_LRS, "CoFiTune + importance pull to base", "cofitune", True),
    Method(
        "cofitune_restrained",
        build_cofitune_restrained,
        _ADAPTER_LRS,
        "CoFiTune window + soft mask outside",
        "cofitune",
        True,
    ),
    Method("cofitune_l2out", build_cofitune_l2out, _FULL_LRS, "CoFiTune window + L2 to base outside", "cofitune"),
    *(
        Method(
            f"{name}_replay{int(100 * f)}",
            build,
            lrs,
            f"{label} + {int(100 * f)}% replay",
            family,
            train_data=ReplayMix(f),
        )
        for name, build, lrs, label, family in (
            ("full", build_full, _FULL_LRS, "full fine-tuning", "baseline"),
            ("lora", build_lora, _ADAPTER_LRS, "LoRA r16", "baseline"),
            ("cofitune", build_cofitune, _ADAPTER_LRS, "CoFiTune coarse", "cofitune"),
        )
        for f in (0.1, 0.25)
    ),
):
    register_method(_m)
