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

from . import _compat
from .architectures import table
from .checkpointing import fix_input_grads
from .config import CoFiTuneConfig, describe_importance, strength_problems
from .errors import CoFiTuneError
from .experts import ExpertsLayer
from .importance import Importance, resolve_importance
from .layer import CoFiTuneLayer, Linear
from .plan import build_plan, peft_selection
from .serving import lora_adapter, weighted_config, weighted_delta

logger = logging.getLogger(__name__)


class CoFiTuneModel(BaseTuner):
    """The PEFT tuner of CoFiTune; create it with `peft.get_peft_model(model, CoFiTuneConfig(...))`."""

    prefix: str = "cofitune_"
    tuner_layer_cls = (CoFiTuneLayer, ExpertsLayer)
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _prepare_model(self, peft_config: CoFiTuneConfig, model: nn.Module) -> None:
        # PEFT calls this once per adapter right before injecting it; the plan for that injection lives here, on the
        # tuner, until `_post_injection_hook` drops it.
        importance = resolve_importance(peft_config.pending_importance())
        plan = build_plan(model, peft_config, importance)
        self._cofitune_plan, self._cofitune_modules = plan, plan.modules()
        self._cofitune_pending = importance
        # The resolved window is written back (and saved), so the config says what was trained; `target_modules`
        # takes PEFT's meaning: names its matcher resolves to exactly the wrapped modules.
        if peft_config.layers is None and plan.window is not None:
            peft_config.layers = plan.window
        for name, value in peft_selection(plan, model, peft_config).items():
            setattr(peft_config, name, value)

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        modules = getattr(self, "_cofitune_modules", None)
        return modules is not None and key in modules

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        entries = self._cofitune_modules[current_key]
        common = {
            "mode": peft_config.softmask_mode,
            "init_weights": peft_config.init_weights,
            "inference_mode": peft_config.inference_mode,
            "strength": getattr(peft_config, "strength", 1.0),
            "delta_dtype": getattr(peft_config, "delta_dtype", None),
        }
        if entries[0].layout.param is not None:
            params = {
                e.layout.param: {"scale": e.scale, "rows": e.rows, "dim": e.layout.dim, "experts": e.layout.experts}
                for e in entries
            }
            if isinstance(target, ExpertsLayer):
                target.update_layer(adapter_name, params=params, **common)
                return
            new_module = ExpertsLayer(target, adapter_name, params=params, **common)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
            return
        entry = entries[0]
        layer_kwargs = {"axis": entry.layout.axis, "scale": entry.scale, "rows": entry.rows, **common}
        if isinstance(target, CoFiTuneLayer):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        new_module = Linear(target, adapter_name, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child):
        # Unloading a fused-experts wrapper puts back a module without a `weight`; PEFT's version would copy one.
        inner = getattr(child, "base_layer", child)
        if not hasattr(new_module, "base_layer") and not hasattr(inner, "weight"):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _post_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        # The plan's tensors are now in the layers; the importance stays with the tuner (not the config).
        self._cofitune_plan = self._cofitune_modules = None
        self._importances[adapter_name] = self._cofitune_pending
        self._cofitune_pending = None
        if hasattr(config, "_pending_importance"):
            del config._pending_importance
        self._cofitune_reversible = table.runs_layers_outside_autograd(model)
        if self._cofitune_reversible and hasattr(model, "enable_input_require_grads"):
            # reversible layers (Reformer) run their forward without autograd and recompute it in backward: the
            # deltas get gradients only when the layers' input requires grad
            model.enable_input_require_grads()
        if getattr(self, "_cofitune_input_grad_hook", None) is None:
            self._cofitune_input_grad_hook = model.register_forward_pre_hook(
                functools.partial(fix_input_grads, self), with_kwargs=True
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
            if isinstance(module, (CoFiTuneLayer, ExpertsLayer)):
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
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Expert layers keep one tensor per parameter under the adapter: `cofitune_delta.<adapter>.<param>.weight`.
        for container in (".cofitune_delta.", ".cofitune_scale."):
            marker = f"{container}{adapter_name}."
            if marker in key:
                return key.replace(marker, container, 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

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
        own = {k: v for k, v in model.state_dict().items() if _is_adapter_key(k, adapter_name)}
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
        for entry in plan.entries.values():
            layer = self.model.get_submodule(entry.key)
            if isinstance(layer, ExpertsLayer) and adapter_name in layer.cofitune_scale:
                buffer = layer.cofitune_scale[adapter_name].get(entry.layout.param)
            elif isinstance(layer, CoFiTuneLayer) and adapter_name in layer.cofitune_scale:
                buffer = layer.cofitune_scale[adapter_name]
            else:
                continue
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
        layers = [layer for _, layer in self.all_cofitune_layers() if adapter_name in layer.cofitune_strength]
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
        """The wrapped `nn.Linear`/`Conv1D` modules, by name."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, CoFiTuneLayer)]

    def expert_layers(self) -> list[tuple[str, ExpertsLayer]]:
        """The wrapped fused-experts modules, by name."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, ExpertsLayer)]

    def all_cofitune_layers(self) -> list[tuple[str, nn.Module]]:
        """Every wrapped module (linears and fused experts), by name."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, (CoFiTuneLayer, ExpertsLayer))]

    def mask_statistics(self, adapter_name: str | None = None) -> dict[str, float]:
        """Mean soft-mask scale over trained rows (each expert's rows counted) and the fraction with scale < 0.1."""
        adapter_name = adapter_name or self.active_adapters[0]
        total = count = low = 0.0
        pairs = []
        for _, layer in self.cofitune_layers():
            if adapter_name in layer.cofitune_scale:
                pairs.append((layer.cofitune_scale[adapter_name], layer.cofitune_rows[adapter_name]))
        for _, layer in self.expert_layers():
            if adapter_name in layer.cofitune_scale:
                for name in layer.params(adapter_name):
                    pairs.append(
                        (layer.cofitune_scale[adapter_name].get(name), layer.cofitune_rows[adapter_name].get(name))
                    )
        for scale, rows in pairs:
            rows = rows > 0
            scale = scale[rows]
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
        keys = {n for n, layer in self.all_cofitune_layers() if any(a in layer.cofitune_delta for a in adapters)}
        config = weighted_config(self.peft_config, adapters, weights, adapter_name, combination_type, keys)
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
            for _, layer in self.expert_layers():
                if adapter_name not in layer.cofitune_delta:
                    continue
                for name, delta in zip(layer.params(adapter_name), layer.cofitune_delta[adapter_name].values()):
                    total = torch.zeros(delta.weight.shape, dtype=torch.float32, device=delta.weight.device)
                    for other, weight in zip(adapters, weights):
                        if other in layer.cofitune_delta and name in layer.params(other):
                            total += float(weight) * layer.delta(other, name).to(total.device, torch.float32)
                    delta.weight.copy_(total)

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
        experts = [
            name for name, layer in self.expert_layers() if any(a in layer.cofitune_delta for a in adapter_names)
        ]
        if experts:
            raise CoFiTuneError(
                f"`adapter_names` cannot route batch rows through CoFiTune adapters on fused expert parameters "
                f"({experts[0]}); run each adapter on its own batch (PEFT's LoRA `target_parameters` has the same limit)."
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


def _is_adapter_key(key: str, adapter_name: str) -> bool:
    """Whether a model state-dict key is a delta or scale of adapter `adapter_name` (linear or expert layer)."""
    if ".cofitune_delta." not in key and ".cofitune_scale." not in key:
        return False
    nested = f".cofitune_delta.{adapter_name}." in key or f".cofitune_scale.{adapter_name}." in key
    return nested or key.endswith((f".{adapter_name}.weight", f".{adapter_name}"))


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
    return lora_adapter(find_tuner(model), model, rank, adapter_name)
