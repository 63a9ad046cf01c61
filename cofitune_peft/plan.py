"""The plan of one adapter: which weights of which layers a `CoFiTuneConfig` trains on a model, with their scales.

Resolved before any module is replaced, so a bad config changes nothing. CoFiTune (Zhang et al., ACL 2024 Findings,
arXiv 2404.10306) at the coarse level trains chosen modules of a window of decoder layers; the per-row scales are the
fine level's soft mask.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import _compat
from .architectures import (
    ROLES,
    ModelLayout,
    ModuleLayout,
    base_of,
    check_wrappable,
    full_shape,
    model_layout,
    param_owner,
    weight_axis,
)
from .config import CoFiTuneConfig
from .errors import CoFiTuneError
from .importance import Importance, mean_one_factor, module_scale

logger = logging.getLogger(__name__)


@dataclass
class PlanEntry:
    """One trained weight: a module's `weight` or a fused expert parameter (`layout.param`)."""

    key: str  # the module's full name in the model
    layer: int
    layout: ModuleLayout
    roles: frozenset[str]
    scale: torch.Tensor  # [size] or [experts, size]: 1 - I (rescaled under mask_budget='mean_one')
    rows: torch.Tensor  # like scale: 1 for trained rows, 0 for frozen ones (the gate rows of a fused gate_up)


@dataclass
class Plan:
    """What one adapter trains: resolved before any module is replaced, so a bad config changes nothing."""

    layout: ModelLayout
    layers: tuple[int, ...]  # sorted decoder-layer indices
    entries: dict[str, PlanEntry]  # by `key` for a module's weight, `key.param` for an expert parameter

    @property
    def window(self) -> tuple[int, int] | None:
        """The layers as a window `(a, b)` when they are contiguous, else None."""
        a, b = self.layers[0], self.layers[-1] + 1
        return (a, b) if self.layers == tuple(range(a, b)) else None

    def modules(self) -> dict[str, list[PlanEntry]]:
        """The entries by module key (an experts module holds several parameters)."""
        out: dict[str, list[PlanEntry]] = {}
        for entry in self.entries.values():
            out.setdefault(entry.key, []).append(entry)
        return out


def describe_layers(layers) -> str:
    """`'2..4'` for contiguous indices, else the list: for messages."""
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return str(layers)


def default_window(num_layers: int) -> tuple[int, int]:
    """The paper's default "(N/4, N/2]": 0-based layers N//4 .. N//2 - 1 (at least one layer)."""
    start = num_layers // 4
    return start, max(num_layers // 2, start + 1)


def layout_for(model: nn.Module, config: CoFiTuneConfig) -> ModelLayout:
    """The layout `config` describes for `model` (its `unit_map`, else read from the model)."""
    return model_layout(model, getattr(config, "unit_map", None), getattr(config, "layers_pattern", None))


def build_plan(model: nn.Module, config: CoFiTuneConfig, importance: Importance | None = None) -> Plan:
    """Resolve `config` against `model`: window, weights, per-row scales. Raises `CoFiTuneError` on bad input.

    `importance` is the resolved importance (`None`: no soft mask).
    """
    layout = layout_for(model, config)
    roles, names = config.roles_and_names()
    layers = _resolve_layers(config, layout.num_layers)
    if importance is not None:
        importance.validate_layout(layout, source="importance")
    entries, uncovered = {}, set()
    for index in layers:
        layer = layout.layers[index]
        for module_layout in layer.modules:
            key = layout.key(index, module_layout.name)
            selected = _selected(module_layout, key, roles, names)
            if not selected:
                continue
            if config.target_modules is not None and not _compat.peft_target_matches(config, key):
                continue
            size = _checked_size(model, key, module_layout)
            scale, missing = module_scale(importance, index, module_layout)
            uncovered.update(missing)
            rows = module_layout.expand(functools.partial(_row_selected, selected=selected, key=key))
            if module_layout.experts:
                rows = rows.expand(module_layout.experts, -1) if rows.dim() == 1 else rows
                scale = scale.expand(module_layout.experts, -1) if scale.dim() == 1 else scale
            assert rows.shape[-1] == size
            entry_key = key if module_layout.param is None else f"{key}.{module_layout.param}"
            entries[entry_key] = PlanEntry(key, index, module_layout, selected, scale.contiguous(), rows.contiguous())
    if not entries:
        raise CoFiTuneError(_nothing_selected(config, layout, layers))
    _warn_unread(config, layout, layers, roles)
    if uncovered and config.softmask_mode != "none":
        warnings.warn(
            f"the importance has no values for {sorted(uncovered)} units, so the weights feeding them train without a "
            "soft mask; estimate those parts too (estimate_importance covers every part of the layout).",
            stacklevel=3,
        )
    if importance is not None and config.softmask_mode == "none":
        logger.info("`importance` is given but `softmask_mode='none'`: the soft mask is off.")
    if config.mask_budget == "mean_one":
        apply_mean_one(entries, config.mask_cap)
    return Plan(layout=layout, layers=layers, entries=entries)


def _selected(module_layout: ModuleLayout, key: str, roles, names) -> frozenset[str]:
    """The roles of `module_layout` that the selection trains (all of them when `names` lists the module, by its name
    inside the layer, the end of it, or its full name)."""
    inner = module_layout.name
    if any(inner == n or inner.endswith("." + n) or module_layout.key == n or key == n for n in names):
        return module_layout.roles | {"*"}
    return module_layout.roles & roles


def _row_selected(segment, selected: frozenset[str], key: str) -> torch.Tensor:
    if "*" in selected or segment.roles <= selected:
        return torch.ones(segment.count)
    if segment.roles & selected:
        raise CoFiTuneError(
            f"`parts` selects {sorted(segment.roles & selected)} but rows of {key!r} serve "
            f"{sorted(segment.roles)} at once ({segment.describe()}); select all of {sorted(segment.roles)} or none."
        )
    return torch.zeros(segment.count)


def _checked_size(model: nn.Module, key: str, module_layout: ModuleLayout) -> int:
    """The weight's size along the layout's axis, after checking the module can be wrapped and the sizes agree."""
    try:
        module = model.get_submodule(key)
    except AttributeError as err:
        raise CoFiTuneError(f"the layout names {key!r}, which this model does not have; check `unit_map`.") from err
    if module_layout.param is None:
        base = base_of(module)
        check_wrappable(key, base)
        size = int(full_shape(base.weight)[weight_axis(base, module_layout.axis)])
    else:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        owner, attr = param_owner(base, module_layout.param)
        param = getattr(owner, attr)
        shape = tuple(full_shape(param))
        if len(shape) == 2:  # folded experts (DBRX): [experts * units, hidden]
            shape = (module_layout.experts, shape[0] // module_layout.experts, shape[1])
        size = int(shape[module_layout.dim])
    if size != module_layout.size:
        raise CoFiTuneError(
            f"{key!r}{'.' + module_layout.param if module_layout.param else ''} has {size} features along its "
            f"{module_layout.axis!r} axis but its layout ({module_layout.describe()}) implies {module_layout.size}; "
            "check `unit_map` or the model config."
        )
    return size


def _nothing_selected(config: CoFiTuneConfig, layout: ModelLayout, layers) -> str:
    found = "; ".join(
        f"layer {i}: {layout.layers[i].describe()}"
        + (f" ({', '.join(sorted(m.key for m in layout.layers[i].modules))})" if layout.layers[i].modules else "")
        for i in layers[:6]
    )
    notes = sorted({n for i in layers for n in layout.layers[i].notes})
    filtered = f" and `target_modules`={config.target_modules!r}" if config.target_modules is not None else ""
    return (
        f"`parts`={config.parts!r}{filtered} matched no module in layers {describe_layers(layers)}. Found: {found}"
        + (f". Not readable or not trained: {'; '.join(notes[:4])}" if notes else "")
        + ". Choose other `parts` or another window (`layers`), or describe the layers with `unit_map`."
    )


def _warn_unread(config, layout: ModelLayout, layers, roles) -> None:
    wanted = bool(roles & {"q", "k", "v", "o"})
    unread = sorted({n for i in layers for n in layout.layers[i].notes if n.startswith("attention")})
    if wanted and unread:
        warnings.warn(
            f"`parts`={config.parts!r}: some attention blocks in the window cannot be read and do not train: "
            f"{'; '.join(unread[:3])}. Describe them with `unit_map` to train them.",
            stacklevel=4,
        )


def peft_selection(plan: Plan, model: nn.Module, config: CoFiTuneConfig) -> dict:
    """`target_modules`, `layers_to_transform` and `layers_pattern` that PEFT's matcher resolves to exactly the
    modules `plan` wraps: names inside a layer with the layer indices when that is exact, else the full names."""
    keys = sorted(plan.modules())
    wanted = set(keys)
    inner = sorted({e.layout.name for e in plan.entries.values()})
    layer_list = list(plan.layers)
    all_keys = [name for name, _ in model.named_modules() if name]
    for pattern in (plan.layout.layers_pattern, plan.layout.layers_path):
        candidate = {"target_modules": inner, "layers_to_transform": layer_list, "layers_pattern": pattern}
        if {k for k in all_keys if _compat.peft_target_matches(candidate, k)} == wanted:
            return candidate
    return {"target_modules": keys, "layers_to_transform": layer_list, "layers_pattern": plan.layout.layers_path}


def apply_mean_one(entries: dict[str, PlanEntry], cap: float) -> float:
    """Rescale every entry's scale in place by one factor, so the mean over all trained rows is 1 (rows capped at `cap`).

    One factor for the whole adapter (not one per module) keeps the mask's shape across modules and layers as well as
    within them: only the adapter's total step budget changes. Untrained rows of fused modules are rescaled too (their
    scale is never used). Returns the factor.
    """
    trained = torch.cat([e.scale[e.rows > 0].flatten() for e in entries.values()])  # [trained rows of the adapter]
    factor = mean_one_factor(trained, cap)
    for entry in entries.values():
        entry.scale = (entry.scale.double() * factor).clamp_max(cap).float()
    mean = (
        float(torch.cat([e.scale[e.rows > 0].flatten() for e in entries.values()]).double().mean())
        if len(trained)
        else 1.0
    )
    if mean < 1.0 - 1e-4:
        warnings.warn(
            f"`mask_budget='mean_one'`: too few rows can move for a mean scale of 1 under `mask_cap`={cap} (every "
            f"movable row is at the cap, mean {mean:.3f}); raise `mask_cap` or protect fewer units.",
            stacklevel=4,
        )
    return factor


def _resolve_layers(config: CoFiTuneConfig, num_layers: int) -> tuple[int, ...]:
    """The sorted decoder-layer indices `config` trains on a model with `num_layers` layers."""
    if config.layers_to_transform is None and config.layers is not None:
        a, b = config.layers
        if not (0 <= a < b <= num_layers):
            raise CoFiTuneError(
                f"`layers` must lie within [0, {num_layers}) for this model ({num_layers} decoder layers), got "
                f"{(a, b)}; (a, b) trains layers a..b-1, so b may be at most {num_layers}."
            )
    indices = config.layer_indices()
    if indices is None:
        indices = list(range(*default_window(num_layers)))
    outside = [i for i in indices if not 0 <= i < num_layers]
    if outside:
        raise CoFiTuneError(
            f"`layers_to_transform` must hold indices within [0, {num_layers}) for this model ({num_layers} decoder "
            f"layers), got {outside} outside it; drop those indices."
        )
    return tuple(indices)


__all__ = ["ROLES", "Plan", "PlanEntry", "build_plan", "default_window", "describe_layers", "peft_selection"]
