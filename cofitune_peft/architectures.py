"""Where the FFN and attention modules of each architecture live, and which unit each weight row (or column) feeds.

CoFiTune masks a trained weight's change per *unit*: FFN intermediate neurons, FFN output (hidden) features, attention
heads. Which rows of which weight belong to which unit differs between architectures (fused projections, GPT-2's
transposed `Conv1D`, grouped-query attention), so each architecture gets a small table here, and everything else in
the package works from these tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import _compat
from .errors import CoFiTuneError

UNITS = ("intermediate", "output", "head", "kv_head")
ROLES = ("q", "k", "v", "o", "gate", "up", "down")

#: Shorthands accepted by `CoFiTuneConfig.target_modules`, as sets of roles. The paper's "FFN" is up and down
#: projections (the gate stays frozen); its "MHA" is q, k and v.
SHORTHANDS: dict[str, frozenset[str]] = {
    "ffn": frozenset({"up", "down"}),
    "ffn+gate": frozenset({"gate", "up", "down"}),
    "mha": frozenset({"q", "k", "v"}),
    "ffn+mha": frozenset({"up", "down", "q", "k", "v"}),
    "mha+o": frozenset({"q", "k", "v", "o"}),
    "all": frozenset(ROLES),
}


@dataclass(frozen=True)
class Segment:
    """A contiguous block of rows (or columns) of a weight that belongs to one role.

    Args:
        roles (`frozenset[str]`): the roles that own these rows; more than one for fused layouts that cannot be split
            (GPT-NeoX interleaves q, k and v per head).
        unit (`str`): the unit each group of rows feeds: one of `intermediate`, `output`, `head`, `kv_head`, or
            `none` (never masked).
        repeat (`int | str`): rows per unit: an int, or `"head_dim"` / `"3*head_dim"`.
    """

    roles: frozenset[str]
    unit: str
    repeat: int | str = 1


@dataclass(frozen=True)
class ModuleLayout:
    """One trainable module of a decoder layer.

    Args:
        name (`str`): the module's path inside a decoder layer, e.g. `"mlp.up_proj"`.
        axis (`str`): `"out"` when units index output features (rows of an `nn.Linear` weight), `"in"` when they
            index input features (the columns of `o_proj`, grouped by head).
        segments (`tuple[Segment, ...]`): the blocks along that axis, in order.
    """

    name: str
    axis: str
    segments: tuple[Segment, ...]

    @property
    def roles(self) -> frozenset[str]:
        return frozenset().union(*(s.roles for s in self.segments))


def _seg(role: str | tuple[str, ...], unit: str, repeat: int | str = 1) -> Segment:
    roles = frozenset((role,) if isinstance(role, str) else role)
    return Segment(roles, unit, repeat)


def _mod(name: str, axis: str, *segments: Segment) -> ModuleLayout:
    return ModuleLayout(name, axis, tuple(segments))


@dataclass(frozen=True)
class ArchSpec:
    """The CoFiTune view of one architecture.

    Args:
        layers_pattern (`str`): the name of the `ModuleList` that holds the decoder layers (`"layers"`, `"h"`).
        modules (`tuple[ModuleLayout, ...]`): the trainable modules of a decoder layer.
        attn_out (`str`): the attention output projection; its input, viewed as `[..., heads, head_dim]`, is where the
            head gates act.
        ffn_down (`str`): the FFN output projection; its input is gated per intermediate unit and its output per
            hidden feature.
    """

    layers_pattern: str
    modules: tuple[ModuleLayout, ...]
    attn_out: str
    ffn_down: str

    def module(self, name: str) -> ModuleLayout:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)


_LLAMA = ArchSpec(
    layers_pattern="layers",
    modules=(
        _mod("self_attn.q_proj", "out", _seg("q", "head", "head_dim")),
        _mod("self_attn.k_proj", "out", _seg("k", "kv_head", "head_dim")),
        _mod("self_attn.v_proj", "out", _seg("v", "kv_head", "head_dim")),
        _mod("self_attn.o_proj", "in", _seg("o", "head", "head_dim")),
        _mod("mlp.gate_proj", "out", _seg("gate", "intermediate")),
        _mod("mlp.up_proj", "out", _seg("up", "intermediate")),
        _mod("mlp.down_proj", "out", _seg("down", "output")),
    ),
    attn_out="self_attn.o_proj",
    ffn_down="mlp.down_proj",
)

_PHI3 = ArchSpec(
    layers_pattern="layers",
    modules=(
        _mod(
            "self_attn.qkv_proj",
            "out",
            _seg("q", "head", "head_dim"),
            _seg("k", "kv_head", "head_dim"),
            _seg("v", "kv_head", "head_dim"),
        ),
        _mod("self_attn.o_proj", "in", _seg("o", "head", "head_dim")),
        # Phi-3 computes `gate, up = gate_up_proj(x).chunk(2, dim=-1)`: gate rows first.
        _mod("mlp.gate_up_proj", "out", _seg("gate", "intermediate"), _seg("up", "intermediate")),
        _mod("mlp.down_proj", "out", _seg("down", "output")),
    ),
    attn_out="self_attn.o_proj",
    ffn_down="mlp.down_proj",
)

_GPT2 = ArchSpec(
    layers_pattern="h",
    modules=(
        # Conv1D stores weights as [in, out]; "out" still means output features, the layer resolves the dim.
        _mod(
            "attn.c_attn",
            "out",
            _seg("q", "head", "head_dim"),
            _seg("k", "head", "head_dim"),
            _seg("v", "head", "head_dim"),
        ),
        _mod("attn.c_proj", "in", _seg("o", "head", "head_dim")),
        _mod("mlp.c_fc", "out", _seg("up", "intermediate")),
        _mod("mlp.c_proj", "out", _seg("down", "output")),
    ),
    attn_out="attn.c_proj",
    ffn_down="mlp.c_proj",
)

_GPT_NEOX = ArchSpec(
    layers_pattern="layers",
    modules=(
        # query_key_value rows are laid out per head as [q | k | v] (view(..., heads, 3 * head_dim)).
        _mod("attention.query_key_value", "out", _seg(("q", "k", "v"), "head", "3*head_dim")),
        _mod("attention.dense", "in", _seg("o", "head", "head_dim")),
        _mod("mlp.dense_h_to_4h", "out", _seg("up", "intermediate")),
        _mod("mlp.dense_4h_to_h", "out", _seg("down", "output")),
    ),
    attn_out="attention.dense",
    ffn_down="mlp.dense_4h_to_h",
)

_OPT = ArchSpec(
    layers_pattern="layers",
    modules=(
        _mod("self_attn.q_proj", "out", _seg("q", "head", "head_dim")),
        _mod("self_attn.k_proj", "out", _seg("k", "head", "head_dim")),
        _mod("self_attn.v_proj", "out", _seg("v", "head", "head_dim")),
        _mod("self_attn.out_proj", "in", _seg("o", "head", "head_dim")),
        _mod("fc1", "out", _seg("up", "intermediate")),
        _mod("fc2", "out", _seg("down", "output")),
    ),
    attn_out="self_attn.out_proj",
    ffn_down="fc2",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "olmo", "olmo2", "granite"),
        _LLAMA,
    ),
    "phi3": _PHI3,
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,
    "opt": _OPT,
}

#: Mixture-of-experts models store their experts as fused 3-D parameters (transformers >= 5), not as modules.
MOE_MODEL_TYPES = frozenset(
    {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "dbrx", "jamba"}
)


@dataclass(frozen=True)
class Dims:
    """The sizes the masks are built from."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int

    def unit_count(self, unit: str) -> int:
        return {
            "intermediate": self.intermediate,
            "output": self.hidden,
            "head": self.num_heads,
            "kv_head": self.num_kv_heads,
        }[unit]

    def repeat(self, repeat: int | str) -> int:
        if isinstance(repeat, int):
            return repeat
        return {"head_dim": self.head_dim, "3*head_dim": 3 * self.head_dim}[repeat]


def text_config(config):
    """The text config of a (possibly multimodal) transformers config."""
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _first_attr(config, names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    return getattr(text_config(config), "model_type", None) or getattr(config, "model_type", None)


def dims_of(model: nn.Module, spec: ArchSpec | None = None) -> Dims:
    """Read the unit sizes from the model's config (and, for the intermediate size, from its weights)."""
    config = getattr(model, "config", None)
    if config is None:
        raise CoFiTuneError("`model` has no `config`; CoFiTune needs a transformers model (or pass `unit_map`).")
    cfg = text_config(config)
    num_layers = _first_attr(cfg, ("num_hidden_layers", "n_layer", "num_layers"))
    hidden = _first_attr(cfg, ("hidden_size", "n_embd", "d_model"))
    num_heads = _first_attr(cfg, ("num_attention_heads", "n_head"))
    if num_layers is None or hidden is None or num_heads is None:
        raise CoFiTuneError(
            f"`model.config` ({type(cfg).__name__}) lacks the layer count, hidden size or head count that CoFiTune "
            "reads; make sure it is a decoder-only transformers config."
        )
    num_kv_heads = _first_attr(cfg, ("num_key_value_heads",), num_heads)
    head_dim = _first_attr(cfg, ("head_dim",), hidden // num_heads)
    intermediate = _first_attr(cfg, ("intermediate_size", "ffn_dim", "n_inner"))
    if spec is not None:
        # Read the FFN width off the weights: configs disagree on its name and GPT-2 leaves it None.
        for name, module in model.named_modules():
            if name.endswith("." + spec.ffn_down) and hasattr(module, "weight"):
                base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
                if _compat.quantization_of(base) not in (None, _compat.BNB_4BIT, _compat.BNB_8BIT):
                    continue  # packed by another library: keep the config's value; find_targets refuses it by name
                w = base.weight
                intermediate = full_shape(w)[0] if _is_conv1d(module) else full_shape(w)[1]
                break
    if intermediate is None:
        intermediate = 4 * hidden
    return Dims(int(num_layers), int(num_heads), int(num_kv_heads), int(head_dim), int(hidden), int(intermediate))


def full_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's full shape, also under DeepSpeed ZeRO-3 `zero.Init` (empty local tensor) and for bitsandbytes 4-bit
    weights (packed bytes)."""
    return _compat.weight_shape(weight)


def _is_conv1d(module: nn.Module) -> bool:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return isinstance(base, Conv1D)


def weight_axis(module: nn.Module, axis: str) -> int:
    """The dim of `module.weight` that holds output (`axis="out"`) or input (`"in"`) features."""
    out_dim = 1 if _is_conv1d(module) else 0
    return out_dim if axis == "out" else 1 - out_dim


def spec_for(model: nn.Module) -> ArchSpec:
    """The built-in layout for `model`, or a `CoFiTuneError` that says how to describe an unknown one."""
    model_type = model_type_of(model)
    if model_type in MOE_MODEL_TYPES:
        raise CoFiTuneError(
            f"model_type {model_type!r} is a mixture-of-experts model whose expert FFNs are fused 3-D parameters, "
            "which CoFiTune does not support yet. Train its attention instead (`target_modules='mha'`) or pass "
            "explicit `target_modules` naming dense modules (e.g. a shared expert's `up_proj`/`down_proj`) together "
            "with `unit_map`."
        )
    if model_type not in ARCHITECTURES:
        raise CoFiTuneError(
            f"model_type {model_type!r} has no built-in CoFiTune layout (known: {', '.join(sorted(ARCHITECTURES))}). "
            "Describe it yourself: pass `target_modules` as module names and `unit_map` giving each module's unit, "
            "e.g. CoFiTuneConfig(target_modules=['mlp.fc_in', 'mlp.fc_out'], unit_map={'mlp.fc_in': 'intermediate', "
            "'mlp.fc_out': 'output'}, layers_pattern='h'). Units: 'intermediate', 'output', 'head', 'kv_head', "
            "'head@in' (columns grouped by head, as in an attention output projection) or 'none' (no soft mask)."
        )
    return ARCHITECTURES[model_type]


def spec_from_unit_map(unit_map: dict[str, str], layers_pattern: str | None) -> ArchSpec:
    """Build a layout from a user's `unit_map` (see `CoFiTuneConfig.unit_map`)."""
    modules = []
    attn_out = ffn_down = ""
    for name, unit in unit_map.items():
        axis = "out"
        if unit.endswith("@in"):
            unit, axis = unit[: -len("@in")], "in"
        repeat: int | str = "head_dim" if unit in ("head", "kv_head") else 1
        modules.append(_mod(name, axis, Segment(frozenset({name}), unit, repeat)))
        if unit == "head" and axis == "in":
            attn_out = name
        if unit == "output":
            ffn_down = name
    return ArchSpec(
        layers_pattern=layers_pattern or "layers", modules=tuple(modules), attn_out=attn_out, ffn_down=ffn_down
    )


@dataclass
class Target:
    """One module that CoFiTune wraps."""

    key: str  # full module name in the model
    layer: int
    layout: ModuleLayout
    roles: frozenset[str] = field(default_factory=frozenset)  # the selected roles inside this module


def layer_modules(model: nn.Module, layers_pattern: str) -> Iterator[tuple[str, int, str, nn.Module]]:
    """`(key, layer index, name inside the layer, module)` for every module of every decoder layer.

    The decoder layer itself comes with the inner name `""`. This is the one walker over `<layers_pattern>.<i>`.
    """
    pattern = re.compile(rf"(?:^|\.){re.escape(layers_pattern)}\.(\d+)(?:\.(.+))?$")
    for key, module in model.named_modules():
        match = pattern.search(key)
        if match is not None:
            yield key, int(match.group(1)), match.group(2) or "", module


def decoder_layers(model: nn.Module, layers_pattern: str) -> dict[int, nn.Module]:
    """The decoder layers of `model`, by index."""
    return {layer: module for _, layer, inner, module in layer_modules(model, layers_pattern) if not inner}


def find_targets(
    model: nn.Module,
    spec: ArchSpec,
    roles: frozenset[str],
    layers: range,
    explicit_names: frozenset[str] = frozenset(),
) -> list[Target]:
    """All modules of `spec` inside `layers` whose roles intersect `roles` (or whose name is in `explicit_names`)."""
    by_name = {m.name: m for m in spec.modules}
    targets = []
    for key, layer, inner, module in layer_modules(model, spec.layers_pattern):
        layout = by_name.get(inner)
        if layout is None or layer not in layers:
            continue
        if inner in explicit_names:
            selected = layout.roles
        else:
            selected = layout.roles & roles
        if not selected:
            continue
        for seg in layout.segments:
            if seg.roles & selected and not seg.roles <= selected:
                raise CoFiTuneError(
                    f"`target_modules` selects {sorted(seg.roles & selected)} but module {key!r} fuses "
                    f"{sorted(seg.roles)} into rows that cannot be trained separately; select all of "
                    f"{sorted(seg.roles)} or none."
                )
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        check_wrappable(key, module)
        targets.append(Target(key=key, layer=layer, layout=layout, roles=selected))
    return targets


def check_wrappable(key: str, module: nn.Module) -> None:
    """Raise `CoFiTuneError` unless `module` is an `nn.Linear`/`Conv1D` with a floating-point or bitsandbytes weight."""
    library = _compat.quantization_of(module)
    if library is not None and library not in (_compat.BNB_4BIT, _compat.BNB_8BIT):
        raise CoFiTuneError(_compat.unsupported_quantization_message(key, module, library))
    if not isinstance(module, nn.Linear) and not _is_conv1d(module):
        raise CoFiTuneError(
            f"module {key!r} is a {type(module).__name__}; CoFiTune trains `nn.Linear` and GPT-2 style `Conv1D` "
            "modules (plain floating-point, or bitsandbytes 4-bit/8-bit) only."
        )


def count_layers(model: nn.Module, layers_pattern: str) -> int:
    """The number of decoder layers (highest index + 1), 0 when none match `layers_pattern`."""
    found = decoder_layers(model, layers_pattern)
    return max(found) + 1 if found else 0


def segment_widths(layout: ModuleLayout, dims: Dims, size: int) -> list[int]:
    """Rows (or columns) per segment of `layout`; checks that they add up to the weight's `size` along the axis."""
    widths = []
    for seg in layout.segments:
        if seg.unit == "none":
            widths.append(-1)
        else:
            widths.append(dims.unit_count(seg.unit) * dims.repeat(seg.repeat))
    if widths.count(-1) == 1:
        widths[widths.index(-1)] = size - sum(w for w in widths if w >= 0)
    if -1 in widths or sum(widths) != size:
        raise CoFiTuneError(
            f"module {layout.name!r} has {size} features along its {layout.axis!r} axis but its unit layout "
            f"{[(sorted(s.roles), s.unit, s.repeat) for s in layout.segments]} implies {sum(widths)} "
            f"(heads={dims.num_heads}, kv_heads={dims.num_kv_heads}, head_dim={dims.head_dim}, "
            f"intermediate={dims.intermediate}, hidden={dims.hidden}); check `unit_map` or the model config."
        )
    return widths


def row_selection(layout: ModuleLayout, dims: Dims, roles: frozenset[str], size: int) -> torch.Tensor:
    """1 for rows (or columns) of selected roles, 0 for frozen ones (the gate half of a fused `gate_up_proj`)."""
    widths = segment_widths(layout, dims, size)
    parts = [torch.full((w,), 1.0 if seg.roles <= roles else 0.0) for seg, w in zip(layout.segments, widths)]
    return torch.cat(parts)  # [size]
