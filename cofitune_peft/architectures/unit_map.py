"""A layout from a user's `unit_map`: module name inside a decoder layer -> the unit its rows (or columns) feed.

For architectures that inference cannot read. Every mapped module's size is checked against the config's head counts
(per layer for heterogeneous configs), and the FFN's intermediate width against both of its projections.
"""

from __future__ import annotations

from torch import nn

from ..errors import CoFiTuneError
from .blocks import linear_dims
from .config_read import HEADS, HIDDEN, KV_HEADS, first_int, layer_config, model_config
from .layout import Gate, LayerLayout, ModelLayout, plain, seg
from .locate import find_decoder_layers

#: The roles a unit gives its module, so that `parts` selects mapped modules as it selects inferred ones.
UNIT_ROLES = {"intermediate": ("up",), "output": ("down",), "head": ("q",), "kv_head": ("k", "v"), "head@in": ("o",)}


def _exact(value: int, by: int | None, what: str) -> int:
    if not by or value % by:
        raise CoFiTuneError(f"`unit_map`: {what} has {value} features, not a multiple of {by}; check `unit_map`.")
    return value // by


def unit_map_layout(model: nn.Module, unit_map: dict[str, str], layers_pattern: str | None) -> ModelLayout:
    """The `ModelLayout` that `unit_map` describes (each module's role is its own name)."""
    path, layer_list = find_decoder_layers(model, layers_pattern)
    cfg = model_config(model)
    layers = []
    for index, layer in enumerate(layer_list):
        lcfg = layer_config(cfg, index)
        heads, kv = first_int(lcfg, HEADS), first_int(lcfg, KV_HEADS) or first_int(lcfg, HEADS)
        modules, gates, sizes = [], [], {}
        dims = {}
        for name, unit in unit_map.items():
            try:
                module = layer.get_submodule(name)
            except AttributeError:
                continue
            dims[name] = linear_dims(module)
            in_f, out_f = dims[name]
            role = frozenset(UNIT_ROLES.get(unit, ()))
            if unit == "intermediate":
                modules.append(plain(name, "out", seg(role, "intermediate", 0, out_f)))
                sizes["intermediate"] = out_f
            elif unit == "output":
                modules.append(plain(name, "out", seg(role, "output", 0, out_f)))
                sizes["output"] = out_f
                gates.append(Gate("ffn", name, 0, in_f, out_f, 0))
                sizes.setdefault("intermediate", in_f)
            elif unit == "head":
                modules.append(plain(name, "out", seg(role, "heads", 0, heads, _exact(out_f, heads, name))))
            elif unit == "kv_head":
                group = _exact(heads or 0, kv, f"{heads} heads over {kv} key/value heads of {name}")
                modules.append(plain(name, "out", seg(role, "heads", 0, kv, _exact(out_f, kv, name), group=group)))
            elif unit == "head@in":
                width = _exact(in_f, heads, name)
                modules.append(plain(name, "in", seg(role, "heads", 0, heads, width)))
                gates.append(Gate("heads", name, 0, heads, width))
            else:  # "none"
                modules.append(plain(name, "out", seg(role, None, count=out_f)))
            if unit in ("head", "kv_head", "head@in"):
                if heads is None:
                    raise CoFiTuneError(
                        f"`unit_map[{name!r}]`={unit!r} needs the number of attention heads, which the config does "
                        "not give (`num_attention_heads`); map the module to 'none' instead."
                    )
                sizes["heads"] = heads
        ups = [n for n, u in unit_map.items() if u == "intermediate" and n in dims]
        downs = [n for n, u in unit_map.items() if u == "output" and n in dims]
        for up in ups:
            for down in downs:
                if dims[up][1] != dims[down][0]:
                    raise CoFiTuneError(
                        f"`unit_map`: {up!r} has {dims[up][1]} output features but {down!r} takes {dims[down][0]} "
                        "input features; an 'intermediate' module must feed the 'output' module of its FFN."
                    )
        kinds = tuple(k for k, present in (("attention", "heads" in sizes), ("ffn", "output" in sizes)) if present)
        layers.append(LayerLayout(index, kinds or ("mapped",), tuple(modules), tuple(gates), sizes))
    if not any(layer.modules for layer in layers):
        raise CoFiTuneError(
            f"`unit_map` names {sorted(unit_map)}, but no decoder layer of {path} has a module of those names; give "
            "the names as paths inside a decoder layer (e.g. 'mlp.up_proj')."
        )
    hidden = first_int(cfg, HIDDEN) or 0
    return ModelLayout(path, tuple(layers), hidden, "unit_map")
