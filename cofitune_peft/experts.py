"""The tuner layer for fused mixture-of-experts weights: a delta per expert on `experts.gate_up_proj`/`down_proj`.

transformers 5 stores the experts of a MoE layer as 3-D parameters (`[experts, out, in]`, or `[experts, in, out]` for
transposed layouts such as gpt-oss) that its expert kernels (eager loop, grouped or batched matmul) read as attributes
of the experts module. As PEFT's LoRA `ParamWrapper` does for `target_parameters`, the wrapper below puts a
parametrization on each trained parameter for the duration of the experts module's forward, so every kernel sees
`W = W0 + s * Delta` (each expert's rows scaled by `1 - I` of that expert's units, CoFiTune's soft mask per expert,
arXiv 2404.10306), and removes it afterwards. The delta has the parameter's shape; its gradient is the weight's
gradient (times the row selection, and the mask in `gradient` mode) through the tokens routed to each expert.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn.utils import parametrize

from .architectures import full_shape, param_owner
from .errors import CoFiTuneError
from .layer import DeltaWeight, delta_dtype_for


def _key(name: str) -> str:
    """A parameter's name as a ModuleDict/buffer key (`"mlp.w1"` -> `"mlp__w1"`; keys cannot hold dots)."""
    return name.replace(".", "__")


def _name(key: str) -> str:
    return key.replace("__", ".")


class _Tensors(nn.Module):
    """Named tensors of one adapter (one per trained parameter) as buffers, persistent or not."""

    def __init__(self, tensors: dict[str, torch.Tensor], persistent: bool):
        super().__init__()
        for name, value in tensors.items():
            self.register_buffer(_key(name), value, persistent=persistent)

    def get(self, name: str) -> torch.Tensor:
        return getattr(self, _key(name))


class _Delta(nn.Module):
    """The parametrization of one parameter: `W0 + sum_a (f_a * Delta_a)`, rounded as `W0 + (f * Delta).to(W0.dtype)`."""

    def __init__(self, layer: ExpertsLayer, param: str, adapters: list[str]):
        super().__init__()
        self.__dict__["layer"] = layer  # not a submodule: the layer owns this parametrization, not the other way
        self.param, self.adapters = param, adapters

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for name in self.adapters:
            weight = weight + self.layer.delta(name, self.param).to(weight.dtype)
        return weight


class ExpertsLayer(nn.Module, BaseTunerLayer):
    """CoFiTune around a fused experts module: a full-size delta for each trained parameter, masked per expert unit.

    `params` maps a parameter name (`"gate_up_proj"`, `"down_proj"`) to its plan: `scale` and `rows`, both
    `[experts, size]` (or `[size]`, shared by every expert), and `dim`, the dim of the `[experts, a, b]` parameter
    that `size` runs along. Mixed-adapter batches are not supported (as for PEFT's `ParamWrapper`).
    """

    adapter_layer_names: tuple[str, ...] = ("cofitune_delta",)
    other_param_names: tuple[str, ...] = (
        "cofitune_scale",
        "cofitune_rows",
        "cofitune_mode",
        "cofitune_dims",
        "cofitune_strength",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.cofitune_delta = nn.ModuleDict({})
        self.cofitune_scale = nn.ModuleDict({})  # saved with the adapter: 1 - I per expert row
        self.cofitune_rows = nn.ModuleDict({})  # rebuilt from the config: 1 for trained rows
        self.cofitune_mode: dict[str, str] = {}
        self.cofitune_dims: dict[str, dict[str, int]] = {}
        self.cofitune_strength: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    @property
    def _available_adapters(self) -> set[str]:
        return set(self.cofitune_delta)

    def _param(self, name: str) -> torch.Tensor:
        owner, attr = param_owner(self.get_base_layer(), name)
        if parametrize.is_parametrized(owner, attr):
            return owner.parametrizations[attr].original
        return getattr(owner, attr)

    def update_layer(
        self,
        adapter_name: str,
        *,
        params: dict[str, dict[str, Any]],
        mode: str,
        init_weights: bool = True,
        inference_mode: bool = False,
        strength: float = 1.0,
        delta_dtype: str | None = None,
    ) -> None:
        deltas, scales, rows, dims = {}, {}, {}, {}
        for name, plan in params.items():
            weight = self._param(name)
            shape = full_shape(weight)
            device = weight.device if weight.device.type != "meta" else None
            deltas[name] = DeltaWeight.for_base(self.get_base_layer(), shape, delta_dtype, weight)
            if not init_weights:
                with torch.no_grad():
                    deltas[name].weight.normal_(0.0, 0.02)
            scales[name] = plan["scale"].to(device=device, dtype=torch.float32)
            rows[name] = plan["rows"].to(device=device, dtype=torch.float32)
            dims[name] = plan["dim"]
            self._view(name, shape, plan["experts"], plan["dim"], scales[name])  # checks the sizes
        self.cofitune_delta[adapter_name] = nn.ModuleDict({_key(n): d for n, d in deltas.items()})
        self.cofitune_scale[adapter_name] = _Tensors(scales, persistent=True)
        self.cofitune_rows[adapter_name] = _Tensors(rows, persistent=False)
        self.cofitune_mode[adapter_name] = mode
        self.cofitune_dims[adapter_name] = dims
        self.cofitune_strength[adapter_name] = float(strength)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        return  # the deltas are created on their parameter's device, in their dtype

    def cast_adapter_(self, adapter_name: str, delta_dtype: str | None, autocast_adapter_dtype: bool = True) -> None:
        """`CoFiTuneLayer.cast_adapter_` for each expert delta: `delta_dtype` when given, else PEFT's float32 upcast
        of a bf16/fp16 delta (when `autocast_adapter_dtype`)."""
        for delta in self.cofitune_delta[adapter_name].values() if adapter_name in self.cofitune_delta else ():
            if delta_dtype is not None:
                delta.cast_(delta_dtype_for(self.get_base_layer(), delta_dtype, delta.weight))
            elif autocast_adapter_dtype and delta.weight.dtype in (torch.float16, torch.bfloat16):
                delta.cast_(torch.float32)

    # ------------------------------------------------------------------ the masked delta

    @staticmethod
    def _view(name: str, shape, experts: int, dim: int, vector: torch.Tensor):
        """How a `[experts, size]` (or `[size]`) vector broadcasts to the parameter: a function of the vector."""
        view = tuple(shape) if len(shape) == 3 else (experts, shape[0] // experts, shape[1])
        if vector.shape[-1] != view[dim]:
            raise CoFiTuneError(
                f"expert parameter {name!r} of shape {tuple(shape)} has {view[dim]} features along dim {dim}, but its "
                f"soft-mask scale has {vector.shape[-1]}."
            )

        def broadcast(v: torch.Tensor) -> torch.Tensor:
            v = v if v.dim() == 2 else v.expand(view[0], -1)  # [experts, size]
            v = v.unsqueeze(2) if dim == 1 else v.unsqueeze(1)  # [experts, size, 1] or [experts, 1, size]
            return v if len(shape) == 3 else v.expand(view).reshape(shape)

        return broadcast

    def _factors(self, adapter_name: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.cofitune_rows[adapter_name].get(name)
        scale = self.cofitune_scale[adapter_name].get(name)
        forward = rows * scale if self.cofitune_mode[adapter_name] == "update" else rows
        strength = self.cofitune_strength.get(adapter_name, 1.0)
        forward = forward if strength == 1.0 else forward * strength
        backward = rows * scale if self.cofitune_mode[adapter_name] == "gradient" else rows
        weight = self._param(name)
        broadcast = self._view(
            name, full_shape(weight), forward.shape[0], self.cofitune_dims[adapter_name][name], forward
        )
        return broadcast(forward), broadcast(backward)

    def delta(self, adapter_name: str, name: str) -> torch.Tensor:
        """The change adapter `adapter_name` makes to parameter `name` (differentiable w.r.t. the delta)."""
        forward, backward = self._factors(adapter_name, name)
        return self.cofitune_delta[adapter_name][_key(name)](forward, backward)

    def get_delta_weight(self, adapter_name: str, name: str | None = None) -> torch.Tensor:
        """The change of parameter `name` (the only trained one when None)."""
        names = self.params(adapter_name)
        if name is None:
            if len(names) != 1:
                raise CoFiTuneError(
                    f"{type(self.get_base_layer()).__name__} has several trained parameters {names}; name one."
                )
            name = names[0]
        return self.delta(adapter_name, name)

    def params(self, adapter_name: str) -> list[str]:
        """The names of the parameters adapter `adapter_name` trains."""
        return [_name(k) for k in self.cofitune_delta[adapter_name]]

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's `convert_to_lora` turns `nn.Linear` deltas into LoRA factors; a fused expert parameter is not one."""
        return False

    @contextlib.contextmanager
    def _parametrized(self, adapters: list[str]):
        names = sorted({n for a in adapters for n in self.params(a)})
        registered = []
        try:
            for name in names:
                using = [a for a in adapters if name in self.params(a)]
                owner, attr = param_owner(self.get_base_layer(), name)
                requires_grad = getattr(owner, attr).requires_grad
                parametrize.register_parametrization(owner, attr, _Delta(self, name, using), unsafe=True)
                owner.parametrizations[attr].original.requires_grad_(requires_grad)
                registered.append((owner, attr))
            with parametrize.cached():
                yield
        finally:
            for owner, attr in registered:
                parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        if adapter_names is not None:
            raise CoFiTuneError(
                "`adapter_names` (a mixed-adapter batch) is not supported by CoFiTune adapters on fused expert "
                "parameters, as for PEFT's LoRA `target_parameters`; run each adapter on its own batch."
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        names = [n for n in self.active_adapters if n in self._available_adapters]
        if self.merged or not names:
            return self.base_layer(*args, **kwargs)
        with self._parametrized(names):
            return self.base_layer(*args, **kwargs)

    # ------------------------------------------------------------------ merge

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self._available_adapters:
                continue
            with torch.no_grad():
                for name in self.params(adapter):
                    param = self._param(name)
                    merged = param.data + self.delta(adapter, name).to(param.dtype)
                    if safe_merge and not torch.isfinite(merged).all():
                        raise CoFiTuneError(
                            f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken: merging it "
                            f"into {name!r} would give NaN/inf weights; nothing was merged."
                        )
                    param.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self._available_adapters:
                with torch.no_grad():
                    for name in self.params(adapter):
                        param = self._param(name)
                        param.data -= self.delta(adapter, name).to(param.dtype)

    def __repr__(self) -> str:
        return "cofitune." + super().__repr__()
