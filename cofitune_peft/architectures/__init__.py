"""How CoFiTune reads a model: its text decoder's layers, and in each layer which rows of which weight feed which unit.

`model_layout(model)` reads it from the model (`infer.py`: module classes and names, checked against weight shapes),
with a short table of exceptions (`table.py`), or from a user's `unit_map` (`unit_map.py`). Everything else in the
package (the plan, the soft mask, the importance estimator, the memory model) works from the `ModelLayout` it returns.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import nn

from .config_read import layer_config, model_type_of, read, text_config
from .infer import infer_layout
from .layout import (
    EXPERT_PARTS,
    PARTS,
    ROLES,
    SHORTHANDS,
    UNITS,
    Gate,
    LayerLayout,
    ModelLayout,
    ModuleLayout,
    Segment,
    base_of,
    check_wrappable,
    full_shape,
    is_conv1d,
    param_owner,
    weight_axis,
)
from .locate import find_decoder_layers, layer_index_pattern
from .unit_map import unit_map_layout

__all__ = [
    "EXPERT_PARTS",
    "PARTS",
    "ROLES",
    "SHORTHANDS",
    "UNITS",
    "Dims",
    "Gate",
    "LayerLayout",
    "ModelLayout",
    "ModuleLayout",
    "Segment",
    "base_of",
    "check_wrappable",
    "dims_of",
    "find_decoder_layers",
    "full_shape",
    "is_conv1d",
    "layer_config",
    "layer_index_pattern",
    "model_layout",
    "model_type_of",
    "param_owner",
    "read",
    "text_config",
    "weight_axis",
]


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_layout(model: nn.Module, unit_map: dict[str, str] | None = None, layers_pattern: str | None = None):
    """The `ModelLayout` of `model` (a transformers model, not a PeftModel): from `unit_map` when given, else read
    from the model. Raises `CoFiTuneError` naming what was found when nothing can be read.

    The layout is kept with the model and read again when any module or parameter of its decoder layers changed
    (wrapping them in CoFiTune layers, or replacing them).
    """
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    key = (repr(sorted(unit_map.items())) if unit_map is not None else None, layers_pattern)
    _, layers = find_decoder_layers(model, layers_pattern)
    fingerprint = (id(layers), *(id(m) for m in layers.modules()), *(id(p) for p in layers.parameters()))
    cached = _CACHE.get(model, {}).get(key)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    if unit_map is not None:
        layout = unit_map_layout(model, unit_map, layers_pattern)
    else:
        layout = infer_layout(model, layers_pattern)
    _CACHE.setdefault(model, {})[key] = (fingerprint, layout)
    return layout


@dataclass(frozen=True)
class Dims:
    """A model's sizes in one place, from its layout: those of its first layer with attention (heads) and with an FFN.

    For models whose layers differ (per-layer head dims, MoE and dense layers), `ModelLayout` has the per-layer truth;
    this summary is for the memory model and messages.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    experts: int = 0
    expert_intermediate: int = 0


def dims_of(model: nn.Module, layout: ModelLayout | None = None) -> Dims:
    """The `Dims` summary of `model` (see `Dims`)."""
    layout = layout or model_layout(model)
    heads = kv = head_dim = inter = 0
    for layer in layout.layers:
        for gate in layer.gates:
            if gate.kind == "heads" and not heads:
                heads, head_dim = gate.count, gate.width
            if gate.kind == "ffn" and not inter:
                inter = gate.count
        for module in layer.modules:
            for s in module.segments:
                if "k" in s.roles and s.part == "heads" and not kv:
                    kv = s.count
    return Dims(
        num_layers=layout.num_layers,
        num_heads=heads,
        num_kv_heads=kv or heads,
        head_dim=head_dim,
        hidden=layout.hidden,
        intermediate=inter,
        experts=layout.experts(),
        expert_intermediate=max((layer.sizes.get("expert_intermediate", 0) for layer in layout.layers), default=0),
    )
