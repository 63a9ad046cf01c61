"""The plan of one adapter: which modules of which layers a `CoFiTuneConfig` trains on a model, with their scales.

Resolved before any module is replaced, so a bad config changes nothing. CoFiTune (Zhang et al., ACL 2024 Findings,
arXiv 2404.10306) at the coarse level trains chosen modules of a window of decoder layers; the per-row scales are the
fine level's soft mask.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .architectures import (
    ArchSpec,
    Dims,
    Target,
    count_layers,
    dims_of,
    find_targets,
    full_shape,
    row_selection,
    spec_for,
    spec_from_unit_map,
    weight_axis,
)
from .config import CoFiTuneConfig
from .errors import CoFiTuneError
from .importance import Importance, mean_one_factor, module_scale

logger = logging.getLogger(__name__)


@dataclass
class PlanEntry:
    target: Target
    scale: torch.Tensor  # [axis size], 1 - I (rescaled under mask_budget='mean_one')
    rows: torch.Tensor  # [axis size], 0/1 row selection


@dataclass
class Plan:
    """What one adapter trains: resolved before any module is replaced, so a bad config changes nothing."""

    spec: ArchSpec
    dims: Dims
    layers: tuple[int, ...]  # sorted decoder-layer indices
    entries: dict[str, PlanEntry]

    @property
    def window(self) -> tuple[int, int] | None:
        """The layers as a window `(a, b)` when they are contiguous, else None."""
        a, b = self.layers[0], self.layers[-1] + 1
        return (a, b) if self.layers == tuple(range(a, b)) else None


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


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def build_plan(model: nn.Module, config: CoFiTuneConfig, importance: Importance | None = None) -> Plan:
    """Resolve `config` against `model`: window, modules, per-row scales. Raises `CoFiTuneError` on bad input.

    `importance` is the resolved importance (`None`: no soft mask).
    """
    roles, names = config.roles_and_names()
    if config.unit_map is not None:
        if not names:
            raise CoFiTuneError(
                "with `unit_map`, pass `target_modules` as a list of module names from `unit_map`, got "
                f"{config.target_modules!r}."
            )
        missing = sorted(n for n in names if n not in config.unit_map)
        if missing:
            raise CoFiTuneError(f"`target_modules` names {missing} have no entry in `unit_map`; add their units.")
        spec = spec_from_unit_map(config.unit_map, config.layers_pattern)
    else:
        spec = spec_for(model)
        if config.layers_pattern is not None:
            spec = ArchSpec(config.layers_pattern, spec.modules, spec.attn_out, spec.ffn_down)
        # accept short names ("up_proj") as well as paths inside the layer ("mlp.up_proj")
        resolved = set()
        for name in names:
            matches = [m.name for m in spec.modules if m.name == name or m.name.endswith("." + name)]
            if not matches:
                raise CoFiTuneError(
                    f"`target_modules` entry {name!r} is not a trainable module of this architecture; choose from "
                    f"{[m.name for m in spec.modules]} or the shorthands 'ffn', 'ffn+gate', 'mha', 'ffn+mha'."
                )
            resolved.update(matches)
        names = frozenset(resolved)
    dims = dims_of(model, spec if spec.ffn_down else None)
    found_layers = count_layers(model, spec.layers_pattern)
    if found_layers == 0:
        raise CoFiTuneError(
            f"no decoder layers named '{spec.layers_pattern}.<i>' found in the model; set `layers_pattern` to the name "
            "of the ModuleList that holds the decoder layers."
        )
    num_layers = found_layers
    layers = _resolve_layers(config, num_layers)
    targets = find_targets(model, spec, roles, frozenset(layers), names)
    if not targets:
        raise CoFiTuneError(
            f"`target_modules`={config.target_modules!r} matched no module in layers {describe_layers(layers)}; "
            f"this architecture's trainable modules are {[m.name for m in spec.modules]}."
        )
    if importance is not None:
        importance.validate_dims(dims, source="importance")
    entries, uncovered = {}, set()
    for target in targets:
        module = _base(model.get_submodule(target.key))
        size = full_shape(module.weight)[weight_axis(module, target.layout.axis)]
        scale, missing = module_scale(importance, target.layer, target.layout, dims, size)
        uncovered.update(missing)
        rows = row_selection(target.layout, dims, target.roles, size)
        entries[target.key] = PlanEntry(target, scale, rows)
    if uncovered and config.softmask_mode != "none":
        warnings.warn(
            f"the importance has no values for {sorted(uncovered)} units, so modules feeding them train without a "
            "soft mask; estimate those parts too (estimate_importance covers heads, intermediate and output).",
            stacklevel=3,
        )
    if importance is not None and config.softmask_mode == "none":
        logger.info("`importance` is given but `softmask_mode='none'`: the soft mask is off.")
    if config.mask_budget == "mean_one":
        apply_mean_one(entries, config.mask_cap)
    return Plan(spec=spec, dims=dims, layers=layers, entries=entries)


def apply_mean_one(entries: dict[str, PlanEntry], cap: float) -> float:
    """Rescale every entry's scale in place by one factor, so the mean over all trained rows is 1 (rows capped at `cap`).

    One factor for the whole adapter (not one per module) keeps the mask's shape across modules and layers as well as
    within them: only the adapter's total step budget changes. Untrained rows of fused modules are rescaled too (their
    scale is never used). Returns the factor.
    """
    trained = torch.cat([e.scale[e.rows > 0] for e in entries.values()])  # [trained rows of the adapter]
    factor = mean_one_factor(trained, cap)
    for entry in entries.values():
        entry.scale = (entry.scale.double() * factor).clamp_max(cap).float()
    mean = float(torch.cat([e.scale[e.rows > 0] for e in entries.values()]).double().mean()) if len(trained) else 1.0
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
