"""The tuner layer: a frozen base weight W0 plus a trained delta, with the soft mask applied per row.

Modes (see `CoFiTuneConfig.softmask_mode`), with `s = 1 - I` per row (or column) and `r` the 0/1 row selection:

- `update`:   W = W0 + (s * r) * Delta, and Delta receives W's gradient (times r) unscaled. The optimizer thus
  computes its step from the true gradient of W, and the weight moves by s times that step: "scale the step after
  the optimizer", for AdamW, SGD or any other optimizer, with gradient clipping seeing the true gradient norm.
- `gradient`: W = W0 + r * Delta, with Delta's gradient multiplied by s (identity forward, scaled backward). This is
  the paper's placement; Adam divides a constant per-row factor out again, so under AdamW it is close to a no-op.
- `none`:     W = W0 + r * Delta.

All three are ops inside the forward pass, so they are right under DDP, FSDP1 and FSDP2 and survive
`cast_adapter_dtype` (parameter hooks would not; see docs/method.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._compat import BufferDict
from .architectures import full_shape, weight_axis
from .errors import CoFiTuneError


class _MaskedDelta(torch.autograd.Function):
    """`delta * forward_scale` in the forward pass; the incoming gradient times `backward_scale` in the backward pass.

    With `backward_scale != forward_scale` this is deliberately not the exact derivative: it lets the mask act on
    the optimizer's step (`update` mode) or on the gradient only (`gradient` mode), see the module docstring.
    """

    @staticmethod
    def forward(ctx, delta, forward_scale, backward_scale):
        ctx.save_for_backward(backward_scale)
        return delta * forward_scale

    @staticmethod
    def backward(ctx, grad):
        (backward_scale,) = ctx.saved_tensors
        return grad * backward_scale, None, None


class DeltaWeight(nn.Module):
    """Holds one adapter's trained change of a weight, in the base weight's layout.

    A leaf module with a `.weight`, so PEFT's FSDP auto-wrap policy and TRL's `.default.` name checks see it like a
    LoRA matrix. Its forward returns the masked delta: under FSDP1 the auto-wrap policy makes it an FSDP unit, and
    only a call through its forward gathers the full weight from the local shard.
    """

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device | None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))

    def forward(self, forward_scale: torch.Tensor, backward_scale: torch.Tensor) -> torch.Tensor:
        delta = self.weight
        forward_scale = forward_scale.to(delta.dtype)
        if not (delta.requires_grad and torch.is_grad_enabled()):
            return delta * forward_scale
        return _MaskedDelta.apply(delta, forward_scale, backward_scale.to(delta.dtype))


class CoFiTuneLayer(BaseTunerLayer):
    """Mixin holding the CoFiTune state of one wrapped module (one entry per adapter name)."""

    adapter_layer_names: tuple[str, ...] = ("cofitune_delta",)
    other_param_names: tuple[str, ...] = ("cofitune_scale", "cofitune_rows", "cofitune_mode", "cofitune_axis")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.cofitune_delta = nn.ModuleDict({})
        # Saved with the adapter: the soft-mask factor (1 - I) per row/column.
        self.cofitune_scale = BufferDict({}, persistent=True)
        # Rebuilt from the config: 1 for trained rows, 0 for frozen rows of a fused module.
        self.cofitune_rows = BufferDict({}, persistent=False)
        self.cofitune_mode: dict[str, str] = {}
        self.cofitune_axis: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.is_conv1d = isinstance(base_layer, Conv1D)
        if not (isinstance(base_layer, nn.Linear) or self.is_conv1d):
            raise CoFiTuneError(
                f"CoFiTune cannot wrap a {type(base_layer).__name__}; it supports nn.Linear and Conv1D."
            )

    @property
    def _available_adapters(self) -> set[str]:
        return set(self.cofitune_delta)

    def update_layer(
        self,
        adapter_name: str,
        *,
        axis: str,
        scale: torch.Tensor,
        rows: torch.Tensor,
        mode: str,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        weight = self.get_base_layer().weight
        shape = full_shape(weight)
        dim = weight_axis(self.get_base_layer(), axis)
        if scale.shape != (shape[dim],) or rows.shape != scale.shape:
            raise CoFiTuneError(
                f"soft-mask scale of shape {tuple(scale.shape)} does not fit a weight of shape {tuple(shape)} "
                f"along dim {dim}."
            )
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        device = weight.device if weight.device.type != "meta" else None
        self.cofitune_delta[adapter_name] = DeltaWeight(shape, dtype, device)
        if not init_weights:
            with torch.no_grad():
                self.cofitune_delta[adapter_name].weight.normal_(0.0, 0.02)
        self.cofitune_scale[adapter_name] = scale.to(torch.float32)
        self.cofitune_rows[adapter_name] = rows.to(torch.float32)
        self.cofitune_mode[adapter_name] = mode
        self.cofitune_axis[adapter_name] = dim
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _broadcast(self, vector: torch.Tensor, adapter_name: str) -> torch.Tensor:
        # [size] -> [size, 1] for rows, [1, size] for columns
        return vector.unsqueeze(1) if self.cofitune_axis[adapter_name] == 0 else vector.unsqueeze(0)

    def effective_scale(self, adapter_name: str) -> torch.Tensor:
        """The factor by which this adapter's delta reaches the weight in the forward pass, per row/column."""
        rows = self.cofitune_rows[adapter_name]
        if self.cofitune_mode[adapter_name] == "update":
            return rows * self.cofitune_scale[adapter_name]
        return rows

    def gradient_scale(self, adapter_name: str) -> torch.Tensor:
        """The factor applied to the gradient that reaches the delta, per row/column."""
        rows = self.cofitune_rows[adapter_name]
        if self.cofitune_mode[adapter_name] == "gradient":
            return rows * self.cofitune_scale[adapter_name]
        return rows

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change this adapter makes to the base weight (differentiable w.r.t. the delta, with the mask)."""
        forward_scale = self._broadcast(self.effective_scale(adapter_name), adapter_name)
        backward_scale = self._broadcast(self.gradient_scale(adapter_name), adapter_name)
        return self.cofitune_delta[adapter_name](forward_scale, backward_scale)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self._available_adapters:
                continue
            with torch.no_grad():
                delta = self.get_delta_weight(name).to(base.weight.dtype)
                if safe_merge:
                    merged = base.weight.data + delta
                    if not torch.isfinite(merged).all():
                        raise CoFiTuneError(
                            f"merging adapter {name!r} would produce NaN/inf weights; the adapter is broken."
                        )
                    base.weight.data = merged
                else:
                    base.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._available_adapters:
                with torch.no_grad():
                    base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)


class Linear(nn.Module, CoFiTuneLayer):
    """CoFiTune around an `nn.Linear` or a GPT-2 `Conv1D`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__()
        CoFiTuneLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def _weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        weight = base.weight
        for name in self.active_adapters:
            if name in self._available_adapters:
                weight = weight + self.get_delta_weight(name).to(weight.dtype)
        return weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not any(n in self._available_adapters for n in self.active_adapters):
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = self._weight()
        if self.is_conv1d:
            size_out = (*x.size()[:-1], weight.shape[1])
            out = torch.addmm(base.bias, x.view(-1, x.size(-1)).to(weight.dtype), weight)
            return out.view(size_out)
        return F.linear(x.to(weight.dtype) if not torch.is_autocast_enabled() else x, weight, base.bias)

    def __repr__(self) -> str:
        return "cofitune." + super().__repr__()
