"""The tuner layer: a frozen base weight W0 plus a trained delta, with the soft mask applied per row.

Modes (see `CoFiTuneConfig.softmask_mode`), with `s = 1 - I` per row (or column) and `r` the 0/1 row selection:

- `update`:   W = W0 + (s * r) * Delta, and Delta receives W's gradient (times r) unscaled. The optimizer thus
  computes its step from the true gradient of W, and the weight moves by s times that step: "scale the step after
  the optimizer", for AdamW, SGD or any other optimizer, with gradient clipping seeing the true gradient norm.
- `gradient`: W = W0 + r * Delta, with Delta's gradient multiplied by s (identity forward, scaled backward). This is
  the paper's placement; Adam divides a constant per-row factor out again, so under AdamW it is close to a no-op.
- `none`:     W = W0 + r * Delta.

A per-adapter `strength` (`CoFiTuneConfig.strength`, default 1) multiplies the forward factor in every mode,
W = W0 + strength * (...) * Delta, and leaves the gradient factor alone: the weight moves `strength` times the step.

All three are ops inside the forward pass, so they are right under DDP, FSDP1 and FSDP2 and survive
`cast_adapter_dtype` (parameter hooks would not; see docs/method.md).

Memory: `_MaskedLinear` computes `y = x W^T + b` with W = W0 + f * Delta as a temporary freed before it returns, and
saves for backward only the input and references to W0, Delta and the scale vectors; backward rebuilds W. Autograd
through `F.linear(x, W0 + f * Delta)` would keep W, one extra weight-sized tensor per wrapped module, from every
forward to its backward.

Quantized bases (bitsandbytes `Linear4bit` nf4/fp4, double quant, and `Linear8bitLt`) stay quantized and frozen; the
delta trains in fp32 (or the layer's `compute_dtype`, or `CoFiTuneConfig.delta_dtype`), and the forward is
`base_layer(x) + x (f * Delta)^T`: the base output is exactly the quantized layer's own, so a zero delta is the
quantized model bit for bit, and LLM.int8's
outlier handling is kept (dequantize-and-fuse was measured too, see `Linear`). Merging into a quantized base
dequantizes, adds and quantizes again, with a warning about the rounding, as PEFT's LoRA bnb layers do.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import _compat
from ._compat import BufferDict
from .architectures import check_wrappable, full_shape, weight_axis
from .errors import CoFiTuneError

BASE = "__base__"  # PEFT's name for "the base weights" in a mixed-adapter batch


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


def _combine(base_weight, deltas, forward_scales) -> torch.Tensor:
    """W0 + sum_a f_a * D_a (or the sum alone when `base_weight` is None), rounded as `W0 + (f * D).to(W0.dtype)`."""
    weight, fresh = base_weight, False
    for delta, scale in zip(deltas, forward_scales):
        masked = delta * scale
        if weight is None:
            weight, fresh = masked, True
        elif fresh:
            weight.add_(masked.to(weight.dtype))
        else:
            # a + b == b + a bit for bit; adding into the new tensor keeps one temporary instead of two
            weight, fresh = masked.to(weight.dtype).add_(weight), True
    return weight


def _matmul(x, weight, bias, conv1d: bool) -> torch.Tensor:
    if conv1d:  # weight [in, out]
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, flat, weight) if bias is not None else flat.mm(weight)
        return out.view(*x.shape[:-1], weight.shape[1])
    return F.linear(x, weight, bias)


class _MaskedLinear(torch.autograd.Function):
    """`y = x (W0 + sum_a f_a * D_a)^T + b` that keeps no weight-sized tensor of its own from forward to backward.

    `apply(x, W0, b, conv1d, dtype, *deltas, *forward_scales, *backward_scales)`: W0 may be None (the delta term of a
    quantized base); `dtype` is the compute dtype (autocast's, or None: the combined weight's); the scales come
    broadcast to the weight and in each delta's dtype. Gradients: x, W0 and b get their exact ones; D_a gets the
    combined weight's gradient times its backward scale (`_MaskedDelta`'s rule). Forward and the input gradient
    repeat the ops of `F.linear(x.to(dtype), W.to(dtype), b)` bit for bit; the weight gradient is the same product.
    """

    @staticmethod
    def forward(ctx, x, base_weight, bias, conv1d, dtype, *adapters):
        count = len(adapters) // 3
        deltas, forward_scales = adapters[:count], adapters[count : 2 * count]
        needs = ctx.needs_input_grad
        with torch.autocast(x.device.type, enabled=False):
            weight = _combine(base_weight, deltas, forward_scales)
            dtype = dtype or weight.dtype
            xc = x.to(dtype)
            y = _matmul(xc, weight.to(dtype), None if bias is None else bias.to(dtype), conv1d)
        # the input only when some weight needs a gradient; W0 and the deltas are saved as references (no copies)
        wants_weight_grad = needs[1] or any(needs[5 : 5 + count])
        ctx.save_for_backward(xc if wants_weight_grad else None, base_weight, *adapters)
        ctx.meta = (conv1d, dtype, x.dtype, weight.dtype, None if bias is None else bias.dtype, count)
        return y

    @staticmethod
    def backward(ctx, grad):
        conv1d, dtype, x_dtype, weight_dtype, bias_dtype, count = ctx.meta
        xc, base_weight, *adapters = ctx.saved_tensors
        deltas, forward_scales, backward_scales = adapters[:count], adapters[count : 2 * count], adapters[2 * count :]
        needs = ctx.needs_input_grad
        grad_x = grad_w0 = grad_b = None
        grad_deltas = [None] * count
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(dtype)
            flat = grad.reshape(-1, grad.shape[-1])  # [tokens, out]
            if needs[0]:
                weight = _combine(base_weight, deltas, forward_scales).to(dtype)  # rebuilt, freed on return
                grad_x = flat.mm(weight.t() if conv1d else weight)
                del weight
                grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1]).to(x_dtype)
            if needs[2]:
                grad_b = flat.sum(0).to(bias_dtype)
            wanted = [a for a in range(count) if needs[5 + a]]
            if needs[1] or wanted:
                inputs = xc.reshape(-1, xc.shape[-1])  # [tokens, in]
                # the product autograd forms for F.linear / addmm (input^T @ grad), so the sums round alike
                grad_w = inputs.t().mm(flat)  # [in, out]
                grad_w = (grad_w if conv1d else grad_w.t()).to(weight_dtype)
                if needs[1]:
                    grad_w0 = grad_w.to(base_weight.dtype)
                for k, a in enumerate(wanted):
                    g = grad_w.to(deltas[a].dtype)
                    if g is not grad_w or (k == len(wanted) - 1 and not needs[1]):
                        grad_deltas[a] = g.mul_(backward_scales[a])  # nothing else holds g
                    else:
                        grad_deltas[a] = g * backward_scales[a]
        return grad_x, grad_w0, grad_b, None, None, *grad_deltas, *([None] * (2 * count))


def delta_dtype_for(
    base_layer: nn.Module, requested: str | torch.dtype | None = None, weight: torch.Tensor | None = None
) -> torch.dtype:
    """The dtype a new delta of `base_layer` is created in: `requested` (`CoFiTuneConfig.delta_dtype`) when given, else
    the base weight's floating dtype (a bitsandbytes base: its compute dtype; an integer weight: float32). `weight`:
    the weight the delta is added to when it is not `base_layer.weight` (a fused expert parameter).

    Every delta is created through `DeltaWeight.for_base`, which calls this: the one place the dtype is decided.
    """
    if requested is not None:
        return getattr(torch, requested) if isinstance(requested, str) else requested
    if _compat.quantization_of(base_layer) is not None:
        # a 4-bit weight may be stored in bf16 (`quant_storage`): its dtype says nothing about the values
        return _compat.bnb_compute_dtype(base_layer) or torch.float32
    weight = base_layer.weight if weight is None else weight
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


class DeltaWeight(nn.Module):
    """Holds one adapter's trained change of a weight, in the base weight's layout.

    A leaf module with a `.weight`, so PEFT's FSDP auto-wrap policy and TRL's `.default.` name checks see it like a
    LoRA matrix. Under FSDP1 the auto-wrap policy makes it an FSDP unit (under ZeRO-3 DeepSpeed manages it the same
    way), and only a call through its forward gathers the full weight from the local shard: so its forward either
    returns the masked delta, or, given `consume`, calls `consume(delta, forward_scale, backward_scale)` while the
    delta is gathered and returns that result (the sharding library re-gathers the delta for backward through hooks
    it puts on that output).
    """

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device | None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))

    @classmethod
    def for_base(
        cls,
        base_layer: nn.Module,
        shape: torch.Size,
        requested: str | torch.dtype | None = None,
        weight: torch.Tensor | None = None,
    ) -> DeltaWeight:
        """A zero delta of `shape` for `base_layer` (for its `weight`, when that is not `base_layer.weight`), on the
        weight's device (None for a meta weight), in `delta_dtype_for(base_layer, requested, weight)`. Layers that hold
        deltas (this module's `Linear`, expert layers) create them here, so that `CoFiTuneConfig.delta_dtype` applies
        to all of them."""
        weight = base_layer.weight if weight is None else weight
        device = weight.device if weight.device.type != "meta" else None
        return cls(shape, delta_dtype_for(base_layer, requested, weight), device)

    def cast_(self, dtype: torch.dtype) -> None:
        """Store the delta in `dtype` (a new Parameter when it changes, as PEFT's `cast_adapter_dtype` does: build the
        optimizer afterwards)."""
        if self.weight.dtype != dtype:
            self.weight = nn.Parameter(self.weight.data.to(dtype), requires_grad=self.weight.requires_grad)

    def forward(self, forward_scale: torch.Tensor, backward_scale: torch.Tensor, consume=None) -> torch.Tensor:
        delta = self.weight
        forward_scale = forward_scale.to(delta.dtype)
        if consume is not None:
            return consume(delta, forward_scale, backward_scale.to(delta.dtype))
        if not (delta.requires_grad and torch.is_grad_enabled()):
            return delta * forward_scale
        return _MaskedDelta.apply(delta, forward_scale, backward_scale.to(delta.dtype))


class CoFiTuneLayer(BaseTunerLayer):
    """Mixin holding the CoFiTune state of one wrapped module (one entry per adapter name)."""

    adapter_layer_names: tuple[str, ...] = ("cofitune_delta",)
    other_param_names: tuple[str, ...] = (
        "cofitune_scale",
        "cofitune_rows",
        "cofitune_mode",
        "cofitune_axis",
        "cofitune_strength",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.cofitune_delta = nn.ModuleDict({})
        # Saved with the adapter: the soft-mask factor (1 - I) per row/column.
        self.cofitune_scale = BufferDict({}, persistent=True)
        # Rebuilt from the config: 1 for trained rows, 0 for frozen rows of a fused module.
        self.cofitune_rows = BufferDict({}, persistent=False)
        self.cofitune_mode: dict[str, str] = {}
        self.cofitune_axis: dict[str, int] = {}
        # W = W0 + strength * s * Delta; from the config (`strength`), changed by `CoFiTuneModel.set_strength`.
        self.cofitune_strength: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.is_conv1d = isinstance(base_layer, Conv1D)
        check_wrappable(f"<{type(base_layer).__name__} given to CoFiTune>", base_layer)
        # None for a plain floating-point weight, else _compat.BNB_4BIT / _compat.BNB_8BIT
        self.quantization = _compat.quantization_of(base_layer)

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
        strength: float = 1.0,
        delta_dtype: str | None = None,
    ) -> None:
        weight = self.get_base_layer().weight
        shape = full_shape(weight)
        dim = weight_axis(self.get_base_layer(), axis)
        if scale.shape != (shape[dim],) or rows.shape != scale.shape:
            raise CoFiTuneError(
                f"soft-mask scale of shape {tuple(scale.shape)} does not fit a weight of shape {tuple(shape)} "
                f"along dim {dim}."
            )
        self.cofitune_delta[adapter_name] = DeltaWeight.for_base(self.get_base_layer(), shape, delta_dtype)
        if not init_weights:
            with torch.no_grad():
                self.cofitune_delta[adapter_name].weight.normal_(0.0, 0.02)
        self.cofitune_scale[adapter_name] = scale.to(torch.float32)
        self.cofitune_rows[adapter_name] = rows.to(torch.float32)
        self.cofitune_mode[adapter_name] = mode
        self.cofitune_axis[adapter_name] = dim
        self.cofitune_strength[adapter_name] = float(strength)
        self._move_adapter_to_device_of_base_layer(adapter_name)  # casts to the base dtype: undo that for the delta
        if delta_dtype is not None:
            self.cofitune_delta[adapter_name].cast_(delta_dtype_for(self.get_base_layer(), delta_dtype))
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def cast_adapter_(self, adapter_name: str, delta_dtype: str | None, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's `cast_adapter_dtype` for this layer with `CoFiTuneConfig.delta_dtype` applied: the soft-mask buffers
        are upcast to float32 as PEFT does (when `autocast_adapter_dtype`), the delta goes to `delta_dtype` (PEFT's
        upcast when it is None)."""
        low = (torch.float16, torch.bfloat16)
        if autocast_adapter_dtype:
            for buffers in (self.cofitune_scale, self.cofitune_rows):
                if adapter_name in buffers and buffers[adapter_name].dtype in low:
                    buffers[adapter_name] = buffers[adapter_name].to(torch.float32)
        if adapter_name not in self.cofitune_delta:
            return
        delta = self.cofitune_delta[adapter_name]
        if delta_dtype is not None:
            delta.cast_(delta_dtype_for(self.get_base_layer(), delta_dtype))
        elif autocast_adapter_dtype and delta.weight.dtype in low:
            delta.cast_(torch.float32)

    def _broadcast(self, vector: torch.Tensor, adapter_name: str) -> torch.Tensor:
        # [size] -> [size, 1] for rows, [1, size] for columns
        return vector.unsqueeze(1) if self.cofitune_axis[adapter_name] == 0 else vector.unsqueeze(0)

    def effective_scale(self, adapter_name: str) -> torch.Tensor:
        """The factor by which this adapter's delta reaches the weight in the forward pass, per row/column.

        `rows * scale` (`update` mode) or `rows`, times the adapter's `strength` when it is not 1.
        """
        rows = self.cofitune_rows[adapter_name]
        if self.cofitune_mode[adapter_name] == "update":
            rows = rows * self.cofitune_scale[adapter_name]
        strength = self.cofitune_strength.get(adapter_name, 1.0)
        return rows if strength == 1.0 else rows * strength

    def gradient_scale(self, adapter_name: str) -> torch.Tensor:
        """The factor applied to the gradient that reaches the delta, per row/column."""
        rows = self.cofitune_rows[adapter_name]
        if self.cofitune_mode[adapter_name] == "gradient":
            return rows * self.cofitune_scale[adapter_name]
        return rows

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's `convert_to_lora` asks this: a CoFiTune weight is `W0 + get_delta_weight(name)`, so always True.

        The conversion is a truncated SVD of the full-rank masked delta, exact at full rank (`cofitune export`).
        """
        return True

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
                if self.quantization is not None:
                    self._requantize(name, +1, safe_merge)
                else:
                    delta = self.get_delta_weight(name).to(base.weight.dtype)
                    if safe_merge:
                        merged = base.weight.data + delta
                        self._check_finite(merged, name)
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
                    if self.quantization is not None:
                        self._requantize(name, -1, False)
                    else:
                        base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)

    def _check_finite(self, merged: torch.Tensor, name: str) -> None:
        if not torch.isfinite(merged).all():
            # PEFT's own wording first (peft/tuners/lora/layer.py), so code that matches on it keeps working
            raise CoFiTuneError(
                f"NaNs detected in the merged weights. The adapter {name} seems to be broken: merging it into this "
                f"{type(self.get_base_layer()).__name__} would give NaN/inf weights; nothing was merged. Check the "
                "adapter's `cofitune_delta` tensors (or the training run that produced them)."
            )

    def _requantize(self, name: str, sign: int, safe_merge: bool) -> None:
        """Merge (`sign=+1`) or unmerge (`-1`) into a bitsandbytes base: dequantize, add, quantize again (as PEFT)."""
        base = self.get_base_layer()
        warnings.warn(
            f"{'Merging' if sign > 0 else 'Unmerging'} CoFiTune adapter {name!r} into a {self.quantization} base "
            "rounds the weight to the quantization grid again, so outputs may differ from the unmerged model. To merge "
            "exactly, load the base model in bf16 (`torch_dtype=torch.bfloat16`, no `quantization_config`), load the "
            "adapter onto it and merge there.",
            stacklevel=3,
        )
        dense = _compat.dequantize_bnb(base)  # [out, in]
        delta = self.get_delta_weight(name)
        merged = dense.to(delta.dtype) + sign * delta
        if safe_merge:
            self._check_finite(merged, name)
        _compat.requantize_bnb(base, merged.to(dense.dtype))


class Linear(nn.Module, CoFiTuneLayer):
    """CoFiTune around an `nn.Linear`, a GPT-2 `Conv1D`, or a bitsandbytes `Linear4bit`/`Linear8bitLt`.

    Dense bases compute `x (W0 + f * Delta)^T + b` through `_MaskedLinear` (no weight-sized tensor kept for backward).
    Quantized bases compute `base_layer(x) + x (f * Delta)^T`. Measured on CPU (1 thread, bitsandbytes 0.50.2, nf4,
    one 576x1536 layer, 4x256 tokens, fp32, forward + backward): 443 ms and 2.3 MB saved for backward besides the
    delta (the input only), against 216 ms and 5.6 MB for dequantize-and-fuse through `_MaskedLinear` (which keeps the
    dequantized weight). We keep the sum: the base output is the quantized layer's own in every bitsandbytes mode
    (its eval-mode CPU kernels compute in bf16/fp16, LLM.int8 splits outliers), so a zero delta is the quantized model
    bit for bit, and the delta term is never rounded into a bf16 weight. A fused path that dequantizes again in
    backward would be about as fast as fuse at the memory of the sum; it is not implemented.

    `forward(x, adapter_names=[...])` (one name per batch row, `"__base__"` for the base weights) runs each group of
    rows with its own adapter, for inference, like PEFT LoRA's mixed-adapter batches.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__()
        CoFiTuneLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def _through_deltas(self, names: list[str], compute):
        """`compute(deltas + forward_scales + backward_scales)`, run inside every named adapter's `DeltaWeight` forward.

        The forwards nest, so that FSDP1 / ZeRO-3 hold all the deltas gathered while `compute` uses them.
        """
        held = []

        def enter(i: int):
            if i == len(names):
                return compute([t for part in zip(*held) for t in part])
            name = names[i]

            def consume(delta, forward_scale, backward_scale):
                held.append((delta, forward_scale, backward_scale))
                return enter(i + 1)

            forward_scale = self._broadcast(self.effective_scale(name), name)
            backward_scale = self._broadcast(self.gradient_scale(name), name)
            return self.cofitune_delta[name](forward_scale, backward_scale, consume=consume)

        return enter(0)

    def _adapted(self, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The output with the adapters `names` applied (none merged)."""
        base = self.get_base_layer()
        dtype = _compat.autocast_dtype(x.device.type)
        if self.quantization is None:
            # read W0 here, in this module's forward: ZeRO-3 gathers it as an external parameter of this module
            weight, bias = base.weight, base.bias
            return self._through_deltas(
                names, lambda adapters: _MaskedLinear.apply(x, weight, bias, self.is_conv1d, dtype, *adapters)
            )
        result = self.base_layer(x, *args, **kwargs)
        if dtype is None:  # compute the delta term in the delta's dtype, as PEFT LoRA does
            x = x.to(self.cofitune_delta[names[0]].weight.dtype)
        term = self._through_deltas(
            names, lambda adapters: _MaskedLinear.apply(x, None, None, False, dtype, *adapters)
        )
        return result + term.to(result.dtype)

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        if adapter_names is not None:
            self._check_mixed_batch(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        names = [n for n in self.active_adapters if n in self._available_adapters]
        if self.merged or not names:
            return self.base_layer(x, *args, **kwargs)
        return self._adapted(x, names, *args, **kwargs)

    def _check_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> None:
        if len(adapter_names) != len(x):
            raise CoFiTuneError(
                f"`adapter_names` needs one entry per batch row: got {len(adapter_names)} names for {len(x)} rows."
            )
        if self.merged:
            raise CoFiTuneError(
                f"`adapter_names` cannot be used while adapters {self.merged_adapters} are merged into the base "
                "weights; call `model.unmerge_adapter()` first."
            )
        if self.training and torch.is_grad_enabled():
            raise CoFiTuneError(
                "`adapter_names` (a mixed-adapter batch) is for inference, but the model is in training mode with "
                "gradients enabled; call `model.eval()` or run under `torch.no_grad()`."
            )

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(row)
        result = None
        for name, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            sub = x[index]
            if name != BASE and name in self._available_adapters:
                out = self._adapted(sub, [name], *args, **kwargs)
            else:  # "__base__", or an adapter that does not touch this module
                out = self.base_layer(sub, *args, **kwargs)
            if result is None:
                result = out.new_empty((len(x), *out.shape[1:]))
            result[index] = out.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "cofitune." + super().__repr__()
