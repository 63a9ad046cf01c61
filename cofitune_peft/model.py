"""`CoFiTuneModel`: selects the window's modules, wraps them, freezes the rest; save/load/merge come from PEFT.

CoFiTune (Zhang et al., ACL 2024 Findings, arXiv 2404.10306) at the coarse level trains chosen modules of a contiguous
window of decoder layers; the fine level (the soft mask) lives in `layer.py`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import _compat
from .architectures import decoder_layers, spec_for
from .config import CoFiTuneConfig, describe_importance, strength_problems
from .errors import CoFiTuneError
from .importance import Importance, resolve_importance
from .layer import CoFiTuneLayer, Linear
from .plan import build_plan
from .serving import lora_factors, weighted_config, weighted_delta

logger = logging.getLogger(__name__)


class CoFiTuneModel(BaseTuner):
    """The PEFT tuner of CoFiTune; create it with `peft.get_peft_model(model, CoFiTuneConfig(...))`."""

    prefix: str = "cofitune_"
    tuner_layer_cls = CoFiTuneLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _prepare_model(self, peft_config: CoFiTuneConfig, model: nn.Module) -> None:
        # PEFT calls this once per adapter right before injecting it; the plan for that injection lives here, on the
        # tuner, until `_post_injection_hook` drops it.
        importance = resolve_importance(peft_config.pending_importance())
        self._cofitune_plan = build_plan(model, peft_config, importance)
        self._cofitune_pending = importance
        # The resolved window is written back (and saved), so the config says what was trained.
        if peft_config.layers is None and self._cofitune_plan.window is not None:
            peft_config.layers = self._cofitune_plan.window

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        plan = getattr(self, "_cofitune_plan", None)
        return plan is not None and key in plan.entries

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        entry = self._cofitune_plan.entries[current_key]
        layer_kwargs = {
            "axis": entry.target.layout.axis,
            "scale": entry.scale,
            "rows": entry.rows,
            "mode": peft_config.softmask_mode,
            "init_weights": peft_config.init_weights,
            "inference_mode": peft_config.inference_mode,
            "strength": getattr(peft_config, "strength", 1.0),
            "delta_dtype": getattr(peft_config, "delta_dtype", None),
        }
        if isinstance(target, CoFiTuneLayer):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        new_module = Linear(target, adapter_name, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        # The plan's tensors are now in the layers; the importance stays with the tuner (not the config).
        self._cofitune_plan = None
        self._importances[adapter_name] = self._cofitune_pending
        self._cofitune_pending = None
        if hasattr(config, "_pending_importance"):
            del config._pending_importance
        if getattr(self, "_cofitune_input_grad_hook", None) is None:
            self._cofitune_input_grad_hook = model.register_forward_pre_hook(
                functools.partial(_fix_input_grads, self), with_kwargs=True
            )
            self._cofitune_window_hook = None
            # Where `enable_input_require_grads` leaves its hooks; looked up once, checked every forward.
            self._cofitune_embeddings = _compat.input_embeddings(model)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's cast after injection and loading, with `CoFiTuneConfig.delta_dtype` applied to the deltas.

        PEFT (`autocast_adapter_dtype=True`, its default) upcasts bf16/fp16 adapter weights to float32. A config with
        `delta_dtype` keeps its deltas in that dtype instead, whatever the flag says; the deltas are cast one at a
        time, never all at once in float32. Other tuner layers (e.g. `modules_to_save`) get PEFT's own cast.
        """
        config = self.peft_config.get(adapter_name)
        delta_dtype = getattr(config, "delta_dtype", None)
        if delta_dtype is None:
            super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
            return
        from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype

        for module in self.model.modules():
            if isinstance(module, CoFiTuneLayer):
                module.cast_adapter_(adapter_name, delta_dtype, autocast_adapter_dtype)
            elif isinstance(module, BaseTunerLayer):
                cast_adapter_dtype(module, adapter_name, autocast_adapter_dtype)

    @property
    def _importances(self) -> dict[str, Importance | None]:
        if "_cofitune_importances" not in self.__dict__:
            self.__dict__["_cofitune_importances"] = {}
        return self.__dict__["_cofitune_importances"]

    # ------------------------------------------------------------------ save / load

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # Also take this adapter's tensors by key: PEFT finds the tuner layers by module name and strips only a
        # leading `_fsdp_wrapped_module.`, so under FSDP1 with nested units it would save an empty adapter.
        suffixes = (f".{adapter_name}.weight", f".{adapter_name}")
        for key, value in state_dict.items():
            if (".cofitune_delta." in key or ".cofitune_scale." in key) and key.endswith(suffixes):
                out.setdefault(key, value)
        save_dtype = getattr(config, "save_dtype", None)
        if save_dtype is not None:
            dtype = getattr(torch, save_dtype)
            out = {k: (v.to(dtype) if ".cofitune_delta." in k else v) for k, v in out.items()}
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # PEFT loads with strict=False: a key or shape mismatch would load nothing, silently. Check it here.
        own = {
            k: v
            for k, v in model.state_dict().items()
            if (".cofitune_delta." in k or ".cofitune_scale." in k)
            and k.endswith((f".{adapter_name}.weight", f".{adapter_name}"))
        }
        missing = sorted(k for k in own if k not in remapped)
        if missing:
            raise CoFiTuneError(
                f"the adapter weights lack {len(missing)} of the {len(own)} tensors this CoFiTune config needs "
                f"(first: {missing[0]!r}); the adapter was saved for another window, modules or base model."
            )
        for key, value in remapped.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise CoFiTuneError(
                    f"adapter tensor {key!r} has shape {tuple(value.shape)} but the base model needs "
                    f"{tuple(own[key].shape)}; this adapter was trained on a base model of other dimensions."
                )
            if key in own and not torch.isfinite(value.float()).all():
                raise CoFiTuneError(f"adapter tensor {key!r} holds NaN/inf values; the adapter file is corrupt.")
        return remapped

    # ------------------------------------------------------------------ importance

    def set_importance(self, importance, adapter_name: str | None = None) -> None:
        """Rebuild the soft mask of `adapter_name` (default: the active adapter) from `importance`.

        Used by `CoFiTuneCallback` to estimate the importance after the Trainer built the model. `importance` is an
        `Importance`, a path, or None (removes the mask). The trained deltas are untouched.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise CoFiTuneError(f"`adapter_name` {adapter_name!r} does not exist; have {sorted(self.peft_config)}.")
        resolved = resolve_importance(importance)
        plan = build_plan(self.model, self.peft_config[adapter_name], resolved)
        for key, entry in plan.entries.items():
            layer = self.model.get_submodule(key)
            if not isinstance(layer, CoFiTuneLayer) or adapter_name not in layer.cofitune_scale:
                continue
            buffer = layer.cofitune_scale[adapter_name]
            buffer.copy_(entry.scale.to(buffer.device, buffer.dtype))
        stored = self.peft_config[adapter_name]
        stored.importance = importance if isinstance(importance, (str, os.PathLike)) else None
        if isinstance(stored.importance, os.PathLike):
            stored.importance = os.fspath(stored.importance)
        stored.importance_source = None if resolved is None else describe_importance(resolved)
        self._importances[adapter_name] = resolved

    def set_strength(self, value: float, adapter_name: str | None = None) -> None:
        """Set the strength of `adapter_name` (default: the active adapter): `W = W0 + value * s * Delta`.

        No retraining: the config's `strength` (saved with the adapter) and every layer of the adapter change at once,
        so the forward pass, `merge`, `get_delta_weight`, mixed-adapter batches and LoRA export all use the new value.
        `0` is the base model, `1` the trained adapter; one training run thus traces a curve (WiSE-FT for the
        adapter). Raises `CoFiTuneError` for a non-finite value, an unknown adapter, or while the adapter is merged
        (unmerge it first: the merged weights hold the old strength).

        Example:

        ```python
        >>> peft_model.base_model.set_strength(0.5)  # doctest: +SKIP
        ```
        """
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise CoFiTuneError(f"`adapter_name` {adapter_name!r} does not exist; have {sorted(self.peft_config)}.")
        problems = strength_problems(value)
        if problems:
            raise CoFiTuneError(problems[0])
        layers = [layer for _, layer in self.cofitune_layers() if adapter_name in layer.cofitune_strength]
        if any(adapter_name in layer.merged_adapters for layer in layers):
            raise CoFiTuneError(
                f"`set_strength`: adapter {adapter_name!r} is merged into the base weights with its old strength; "
                "call `unmerge_adapter()` first, set the strength, then merge again."
            )
        for layer in layers:
            layer.cofitune_strength[adapter_name] = float(value)
        self.peft_config[adapter_name].strength = float(value)

    def get_importance(self, adapter_name: str | None = None) -> Importance | None:
        """The importance the soft mask of `adapter_name` was built from in this process (None: none, or loaded).

        An adapter loaded from disk carries its per-row scales but not the importance they came from.
        """
        return self._importances.get(adapter_name or self.active_adapters[0])

    # ------------------------------------------------------------------ introspection

    def cofitune_layers(self) -> list[tuple[str, Linear]]:
        """The wrapped modules, by name."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, CoFiTuneLayer)]

    def mask_statistics(self, adapter_name: str | None = None) -> dict[str, float]:
        """Mean soft-mask scale over trained rows and the fraction of rows with scale < 0.1."""
        adapter_name = adapter_name or self.active_adapters[0]
        total = count = low = 0.0
        for _, layer in self.cofitune_layers():
            if adapter_name not in layer.cofitune_scale:
                continue
            rows = layer.cofitune_rows[adapter_name] > 0
            scale = layer.cofitune_scale[adapter_name][rows]
            total += float(scale.sum())
            count += scale.numel()
            low += float((scale < 0.1).sum())
        if count == 0:
            return {"mask_mean_scale": 1.0, "mask_frac_below_0.1": 0.0}
        return {"mask_mean_scale": total / count, "mask_frac_below_0.1": low / count}

    # ------------------------------------------------------------------ serving: weighted sums, mixed batches

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "linear"
    ) -> None:
        """Add `adapter_name`, whose change of each weight is `sum_i weights[i] * (masked change of adapters[i])`.

        Exact, because CoFiTune's deltas are full rank: the new adapter covers the union of the adapters' layers and
        modules (a module only some of them train gets zero change from the others), has no soft mask
        (`softmask_mode="none"`) and holds the weighted sum of the effective deltas, soft masks included. Task
        arithmetic is `weights=[1, 1]`. The new adapter is frozen and not activated; `PeftModel.add_weighted_adapter`
        calls this.

        Args:
            adapters (`list[str]`): existing CoFiTune adapters, each at most once.
            weights (`list[float]`): one finite weight per adapter (any sign).
            adapter_name (`str`): the new adapter's name; must not exist yet.
            combination_type (`str`, *optional*, defaults to `"linear"`): only `"linear"` (the exact weighted sum).

        Example:

        ```python
        >>> model.add_weighted_adapter(["math", "code"], [1.0, 1.0], "both")  # doctest: +SKIP
        >>> model.set_adapter("both")  # doctest: +SKIP
        ```
        """
        config = weighted_config(self.peft_config, adapters, weights, adapter_name, combination_type)
        # PEFT's injection re-applies the active adapters' trainability to every layer it touches; keep it as it was.
        trainable = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.peft_config[adapter_name] = config
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            self.peft_config.pop(adapter_name, None)
            raise
        for name, param in self.model.named_parameters():
            param.requires_grad_(trainable.get(name, False))
        with torch.no_grad():
            for _, layer in self.cofitune_layers():
                if adapter_name not in layer.cofitune_delta:
                    continue
                target = layer.cofitune_delta[adapter_name].weight
                target.copy_(weighted_delta(layer, adapters, weights, target))

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Mixed-adapter batches: `PeftModel.forward/generate(..., adapter_names=[...])` routes row i to adapter i.

        PEFT hands the call's kwargs to this context manager; with `adapter_names` it injects them, through forward
        pre-hooks, into every CoFiTune layer (and `modules_to_save` wrapper), and removes the hooks on exit. Inference
        only; `"__base__"` selects the base model for a row.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        adapter_names = self._check_adapter_names(adapter_names)
        # generate() repeats each prompt num_beams (beam search) or num_return_sequences (sampling) times
        for repeat in ("num_beams", "num_return_sequences"):
            times = kwargs.get(repeat)
            if isinstance(times, int) and times > 1:
                adapter_names = [name for name in adapter_names for _ in range(times)]
                break
        handles = []
        try:
            for module in _compat.mixed_batch_modules(self.model, CoFiTuneLayer):
                hook = functools.partial(_compat.adapter_names_pre_hook, adapter_names=adapter_names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_adapter_names(self, adapter_names) -> list[str]:
        if self.training:
            raise CoFiTuneError(
                "`adapter_names` routes batch rows to adapters at inference only, but the model is in training mode; "
                "call `model.eval()` first (train each adapter on its own)."
            )
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise CoFiTuneError(
                f"`adapter_names` must be a list with one adapter name (or '__base__') per batch row, got "
                f"{adapter_names!r}."
            )
        available = set()
        for _, layer in self.cofitune_layers():
            available.update(layer.cofitune_delta.keys())
            if layer.merged:
                raise CoFiTuneError(
                    "`adapter_names` cannot route rows while adapters are merged into the base weights; call "
                    "`unmerge_adapter()` first."
                )
        unknown = sorted({n for n in adapter_names if n != "__base__"} - available)
        if unknown:
            raise CoFiTuneError(
                f"`adapter_names` names unknown adapters {unknown}; available: {sorted(available)}, or '__base__' for "
                "the base model."
            )
        return list(adapter_names)


def _fix_input_grads(tuner: CoFiTuneModel, module: nn.Module, args, kwargs):
    """Forward pre-hook: undo `enable_input_require_grads`, which drags every layer into the backward pass.

    Trainer and TRL call it whenever PEFT and gradient checkpointing meet. With non-reentrant checkpointing (the
    transformers default) or none, autograd needs no help, so the hook is simply removed. Reentrant checkpointing does
    need a grad-requiring input to a checkpointed layer that holds trainable weights; we give it to the lowest such
    layer instead of to the embeddings, so the layers below it still stay out of the backward pass.
    """
    if not module.training:
        return None
    found = _compat.input_grad_hooks(tuner._cofitune_embeddings)
    if not found:
        return None
    configs = [tuner.peft_config[a] for a in tuner.active_adapters if a in tuner.peft_config]
    if not configs or not all(getattr(c, "fix_input_grads", False) for c in configs):
        return None
    trainable_layers = _lowest_trainable_layer(tuner)
    if trainable_layers is None:
        return None
    lowest, layer_module = trainable_layers
    reentrant = _compat.reentrant_checkpointing(module)
    _compat.remove_input_grad_hooks(module, found)
    if reentrant and tuner._cofitune_window_hook is None:
        tuner._cofitune_window_hook = layer_module.register_forward_pre_hook(_inputs_require_grad, with_kwargs=True)
        logger.info(
            "CoFiTune: removed the input-require-grads hook; reentrant checkpointing gets a grad-requiring input at "
            "layer %d instead, so layers below it stay out of the backward pass.",
            lowest,
        )
    else:
        logger.info(
            "CoFiTune: removed the input-require-grads hook; layers below %d stay out of the backward pass.", lowest
        )
    return None


def _inputs_require_grad(module, args, kwargs):
    def mark(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.requires_grad:
            return t.detach().requires_grad_(True)
        return t

    if not (module.training and torch.is_grad_enabled()):
        return None
    if args:
        return (mark(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        kwargs = dict(kwargs, hidden_states=mark(kwargs["hidden_states"]))
    return args, kwargs


def _lowest_trainable_layer(tuner: CoFiTuneModel) -> tuple[int, nn.Module] | None:
    patterns = set()
    for cfg in tuner.peft_config.values():
        if getattr(cfg, "unit_map", None) is not None:
            patterns.add(cfg.layers_pattern or "layers")
        else:
            try:
                patterns.add(cfg.layers_pattern or spec_for(tuner.model).layers_pattern)
            except CoFiTuneError:
                patterns.add("layers")
    for pattern in patterns:
        layers = decoder_layers(tuner.model, pattern)
        for index in sorted(layers):
            if any(p.requires_grad for p in layers[index].parameters()):
                return index, layers[index]
    return None


def set_importance(
    model: nn.Module, importance: Importance | str | os.PathLike | None, adapter_name: str | None = None
):
    """Install (or, with `None`, remove) the soft mask of a CoFiTune adapter from `importance`.

    The data-driven step as its own call on the model, like PEFT's `initialize_lora_eva_weights`: build the adapter
    with `get_peft_model(model, CoFiTuneConfig(...))`, estimate the importance, then call this. The trained deltas are
    untouched; the per-row scales are rebuilt and saved with the adapter.

    Args:
        model: a `PeftModel` with a CoFiTune adapter (or the `CoFiTuneModel` inside one, possibly wrapped by DDP).
        importance (`Importance | str | None`): an `Importance`, a path to an importance file, or `None`.
        adapter_name (`str`, *optional*): defaults to the active adapter.

    Example:

    ```python
    >>> import torch
    >>> from peft import get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from cofitune_peft import CoFiTuneConfig, Importance, set_importance
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4,
    ...                                      num_attention_heads=4, vocab_size=64))
    >>> model = get_peft_model(base, CoFiTuneConfig(layers=(1, 3)))
    >>> set_importance(model, Importance(intermediate=torch.rand(4, 48), output=torch.rand(4, 32)))
    >>> model.base_model.mask_statistics()["mask_mean_scale"] < 1.0
    True
    ```
    """
    tuner = find_tuner(model)
    if tuner is None:
        raise CoFiTuneError(
            f"`model` ({type(model).__name__}) has no CoFiTune adapter; wrap it with "
            "`get_peft_model(model, CoFiTuneConfig(...))` first."
        )
    tuner.set_importance(importance, adapter_name)


def find_tuner(model) -> CoFiTuneModel | None:
    """The `CoFiTuneModel` inside `model` (a PeftModel, possibly wrapped by DDP/accelerate), or None."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, CoFiTuneModel):
            return model
        base = getattr(model, "base_model", None)
        if isinstance(base, CoFiTuneModel):
            return base
        model = getattr(model, "module", None)  # DDP / FSDP wrappers
    return None


# ---------------------------------------------------------------------- serving: conversion to a stock LoRA


def convert_to_lora(model: nn.Module, rank: int | float, adapter_name: str = "default"):
    """A stock LoRA adapter approximating CoFiTune adapter `adapter_name`: `(LoraConfig, state_dict)`.

    Each trained module's masked delta becomes a rank-`r` LoRA pair (`lora_factors`), with `lora_alpha = r` so the
    LoRA scaling is 1; at full rank (`rank` >= the smaller side of every weight) the result is exact. Save it with
    `safetensors.torch.save_file(state_dict, dir / "adapter_model.safetensors")` and `config.save_pretrained(dir)`,
    and load it with plain PEFT, without `cofitune_peft` (or use `cofitune export --to lora`).

    Args:
        model: a `PeftModel` with a CoFiTune adapter (or its `CoFiTuneModel`).
        rank (`int | float`): the LoRA rank, or a float in (0, 1]: the fraction of the squared singular values to
            keep per module.
        adapter_name (`str`, *optional*, defaults to `"default"`): the adapter to convert.
    """
    from collections import Counter

    from peft import LoraConfig

    tuner = find_tuner(model)
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
