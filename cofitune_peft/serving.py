"""Serving CoFiTune adapters: exact weighted sums of adapters, and stock LoRA factors of a masked delta.

CoFiTune's deltas are full rank, so a weighted sum of adapters is exact (task arithmetic, adapter soups), and a LoRA
of rank r is the truncated SVD of each module's masked delta (exact at full rank). `CoFiTuneModel.add_weighted_adapter`
and `convert_to_lora` (in `model.py`; its LoRA adapter is built by `lora_adapter` here) build on these functions.
"""

from __future__ import annotations

import math

import torch
from transformers.pytorch_utils import Conv1D

from .config import CoFiTuneConfig
from .errors import CoFiTuneError
from .layer import CoFiTuneLayer


def weighted_config(
    peft_config: dict, adapters, weights, adapter_name: str, combination_type: str, module_keys=()
) -> CoFiTuneConfig:
    """The config of `add_weighted_adapter`'s new adapter, after checking its arguments against `peft_config`.

    `module_keys` are the modules the adapters wrap (full names): the new adapter wraps exactly their union.
    """
    if combination_type != "linear":
        raise CoFiTuneError(
            f"`combination_type` must be 'linear' (the exact weighted sum of CoFiTune's full-rank deltas), got "
            f"{combination_type!r}; LoRA's other combinations approximate low-rank factors and do not apply here."
        )
    if isinstance(adapters, str) or not adapters or len(set(adapters)) != len(adapters):
        raise CoFiTuneError(f"`adapters` must be a non-empty list of distinct adapter names, got {adapters!r}.")
    weights = list(weights)
    if len(weights) != len(adapters):
        raise CoFiTuneError(
            f"`weights` must hold one weight per adapter ({len(adapters)}), got {len(weights)}: {weights!r}."
        )
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise CoFiTuneError(f"`weights` must be finite numbers, got {weights!r}.")
    if adapter_name in peft_config:
        raise CoFiTuneError(
            f"`adapter_name` {adapter_name!r} already exists; choose a new name or `delete_adapter` it first."
        )
    unknown = [a for a in adapters if a not in peft_config]
    if unknown:
        raise CoFiTuneError(f"`adapters` names unknown adapters {unknown}; available: {sorted(peft_config)}.")
    configs = [peft_config[a] for a in adapters]
    foreign = [a for a, c in zip(adapters, configs) if not isinstance(c, CoFiTuneConfig)]
    if foreign:
        raise CoFiTuneError(f"`adapters` {foreign} are not CoFiTune adapters; only CoFiTune adapters combine here.")
    for field in ("unit_map", "layers_pattern"):
        values = [getattr(c, field) for c in configs]
        if any(v != values[0] for v in values):
            raise CoFiTuneError(
                f"`adapters` {adapters} differ in `{field}` ({values}), so their modules do not line up and cannot "
                "be combined; combine adapters built with the same `unit_map` and `layers_pattern`."
            )
    with_saved = [a for a, c in zip(adapters, configs) if c.modules_to_save]
    if with_saved:
        raise CoFiTuneError(
            f"`adapters` {with_saved} train whole modules (`modules_to_save`), which have no weight change to sum; "
            "combine adapters without `modules_to_save`."
        )
    layers = set()
    for a, c in zip(adapters, configs):
        indices = c.layer_indices()
        if indices is None:
            raise CoFiTuneError(f"adapter {a!r} has no resolved layers; it was not built on this model.")
        layers.update(indices)
    save_dtypes = {c.save_dtype for c in configs}
    delta_dtypes = {getattr(c, "delta_dtype", None) for c in configs}
    first = configs[0]
    return CoFiTuneConfig(
        layers_to_transform=sorted(layers),
        parts=sorted(module_keys),
        softmask_mode="none",
        unit_map=first.unit_map,
        layers_pattern=first.layers_pattern,
        save_dtype=save_dtypes.pop() if len(save_dtypes) == 1 else None,
        delta_dtype=delta_dtypes.pop() if len(delta_dtypes) == 1 else None,
        fix_input_grads=first.fix_input_grads,
        base_model_name_or_path=first.base_model_name_or_path,
        task_type=first.task_type,
        inference_mode=True,
    )


@torch.no_grad()
def weighted_delta(layer: CoFiTuneLayer, adapters, weights, like: torch.Tensor) -> torch.Tensor:
    """`sum_i weights[i] * (masked delta of adapters[i])` in `layer`, in fp32 on `like`'s device (0 where absent)."""
    total = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for name, weight in zip(adapters, weights):
        if name in layer.cofitune_delta:
            total += float(weight) * layer.get_delta_weight(name).to(like.device, torch.float32)
    return total


@torch.no_grad()
def lora_factors(layer: CoFiTuneLayer, adapter_name: str, rank: int | float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """LoRA factors `(A, B, r)` of one layer: `B @ A` is the best rank-`r` approximation of its masked delta.

    A truncated SVD (Eckart-Young), in the layout of `nn.Linear` (`A`: `[r, in]`, `B`: `[out, r]`) also for GPT-2's
    `Conv1D`. An int `rank` is capped at the smaller side of the weight, where the factors are exact; a float in
    (0, 1] picks the smallest rank that keeps that fraction of the squared singular values, as PEFT's
    `convert_to_lora` does.
    """
    delta = layer.get_delta_weight(adapter_name)
    dtype = delta.dtype
    delta = delta.float()
    if isinstance(layer.get_base_layer(), Conv1D):
        delta = delta.T  # Conv1D stores [in, out]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # [out, k], [k], [k, in]
    if isinstance(rank, float):
        energy = torch.cumsum(s**2, dim=0)
        r = min(int(torch.searchsorted(energy, rank * energy[-1]).item()) + 1, s.numel())
    else:
        r = min(rank, s.numel())
    lora_b = u[:, :r] * s[:r]  # [out, r]
    lora_a = vh[:r]  # [r, in]
    return lora_a.to(dtype).contiguous(), lora_b.to(dtype).contiguous(), r


def lora_adapter(tuner, model, rank: int | float, adapter_name: str = "default"):
    """`convert_to_lora` (in `model.py`) for the `CoFiTuneModel` `tuner` found in `model` (None: there is none)."""
    from collections import Counter

    from peft import LoraConfig

    if tuner is None:
        raise CoFiTuneError(f"`model` ({type(model).__name__}) has no CoFiTune adapter to convert.")
    if adapter_name not in tuner.peft_config:
        raise CoFiTuneError(f"`adapter_name` {adapter_name!r} does not exist; have {sorted(tuner.peft_config)}.")
    is_int = isinstance(rank, int) and not isinstance(rank, bool)
    if not ((is_int and rank >= 1) or (isinstance(rank, float) and 0 < rank <= 1)):
        raise CoFiTuneError(
            f"`rank` must be an int >= 1 or a float in (0, 1] (fraction of singular-value energy), got {rank!r}."
        )
    config = tuner.peft_config[adapter_name]
    experts = [name for name, layer in tuner.expert_layers() if adapter_name in layer.cofitune_delta]
    if experts:
        raise CoFiTuneError(
            f"adapter {adapter_name!r} trains fused expert parameters ({experts[0]}), whose per-expert deltas a LoRA "
            "of `nn.Linear` modules cannot express; export it with `--to merged` instead."
        )
    if getattr(config, "modules_to_save", None):
        raise CoFiTuneError(
            f"adapter {adapter_name!r} trains whole modules (`modules_to_save`={config.modules_to_save}), which a "
            "LoRA cannot express; export it with `--to merged` instead."
        )
    state_dict, ranks, conv1d = {}, {}, False
    for name, layer in tuner.cofitune_layers():
        if adapter_name not in layer.cofitune_delta:
            continue
        lora_a, lora_b, ranks[name] = lora_factors(layer, adapter_name, rank)
        state_dict[f"base_model.model.{name}.lora_A.weight"] = lora_a
        state_dict[f"base_model.model.{name}.lora_B.weight"] = lora_b
        conv1d = conv1d or isinstance(layer.get_base_layer(), Conv1D)
    if not ranks:
        raise CoFiTuneError(f"adapter {adapter_name!r} has no CoFiTune layers in this model; nothing to convert.")
    default = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in ranks.items() if r != default}
    lora_config = LoraConfig(
        r=default,
        lora_alpha=default,
        lora_dropout=0.0,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        fan_in_fan_out=conv1d,
        base_model_name_or_path=config.base_model_name_or_path,
        task_type=config.task_type,
    )
    return lora_config, state_dict
