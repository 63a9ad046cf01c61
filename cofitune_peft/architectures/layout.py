"""The layout of a model for CoFiTune: which rows (or columns) of which weight feed which unit.

CoFiTune (Zhang et al., ACL 2024 Findings, arXiv 2404.10306) masks a trained weight's change per *unit*: attention
heads, FFN intermediate neurons, FFN output (hidden) features, and, in mixture-of-experts layers, the intermediate
neurons and outputs of each expert. A `ModelLayout` says, for every decoder layer, which modules (or fused expert
parameters) CoFiTune can train, which role each of their rows plays (`q`, `k`, `v`, `o`, `gate`, `up`, `down`), which
unit each row feeds, and where the importance estimator's gates sit. It is read from the model (`infer.py`), from a
short table of exceptions (`table.py`) or from a user's `unit_map` (`unit_map.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import _compat
from ..errors import CoFiTuneError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
#: Unit names a `unit_map` may give (plus `"head@in"` for columns grouped by head, and `"none"`).
UNITS = ("intermediate", "output", "head", "kv_head")

#: Shorthands accepted by `CoFiTuneConfig.parts`, as sets of roles. The paper's "FFN" is up and down projections
#: (the gate stays frozen); its "MHA" is q, k and v.
SHORTHANDS: dict[str, frozenset[str]] = {
    "ffn": frozenset({"up", "down"}),
    "ffn+gate": frozenset({"gate", "up", "down"}),
    "mha": frozenset({"q", "k", "v"}),
    "ffn+mha": frozenset({"up", "down", "q", "k", "v"}),
    "mha+o": frozenset({"q", "k", "v", "o"}),
    "all": frozenset(ROLES),
}

#: The importance parts, per decoder layer: `heads` `[units]`, `intermediate` `[units]` (every dense FFN of the layer,
#: shared experts included, one after the other), `output` `[units]` (the hidden-size output of each of those FFNs),
#: and for the routed experts `expert_intermediate` `[experts, units]` and `expert_output` `[experts, hidden]`.
PARTS = ("heads", "intermediate", "output", "expert_intermediate", "expert_output")
EXPERT_PARTS = ("expert_intermediate", "expert_output")


@dataclass(frozen=True)
class Segment:
    """`count` units of one importance part, each fed by `repeat` consecutive rows (or columns) of a weight.

    Args:
        roles (`frozenset[str]`): the roles these rows play (more than one where rows serve several, as MLA's latent
            key/value projection); a role outside `ROLES` is a module name (layouts built from a `unit_map`).
        part (`str | None`): the importance part the units belong to (`PARTS`), or None: the rows are never masked.
        first (`int`): the first unit in the layer's vector of that part (blocks of a layer are laid end to end).
        count (`int`): number of units (for `part=None`: number of rows, with `repeat=1`).
        repeat (`int`): rows per unit.
        group (`int`): units of the part behind each unit here: a key/value head serves `group` query heads and is
            protected as much as the most important of them.
        step (`int`): units per step when the segments of a group are interleaved (`ModuleLayout.groups`).
    """

    roles: frozenset[str]
    part: str | None
    first: int = 0
    count: int = 0
    repeat: int = 1
    group: int = 1
    step: int = 1

    @property
    def rows(self) -> int:
        return self.count * self.repeat

    def describe(self) -> str:
        where = (
            "unmasked" if self.part is None else f"{self.part}[{self.first}:{self.first + self.count * self.group}]"
        )
        return f"{'/'.join(sorted(self.roles))}: {self.count} x {self.repeat} rows -> {where}"


def seg(roles, part, first=0, count=0, repeat=1, group=1, step=1) -> Segment:
    roles = frozenset((roles,) if isinstance(roles, str) else roles)
    return Segment(roles, part, first, count, repeat, group, step)


@dataclass(frozen=True)
class ModuleLayout:
    """One trainable weight of a decoder layer: an `nn.Linear`/`Conv1D` module or a fused expert parameter.

    Args:
        name (`str`): the module's path inside the decoder layer, e.g. `"mlp.up_proj"` or `"mlp.experts"`.
        axis (`str`): `"out"` when the units index output features, `"in"` for input features (the columns of an
            attention output projection, grouped by head).
        groups (`tuple[tuple[Segment, ...], ...]`): blocks along that axis, laid end to end; the segments of one
            block are interleaved `step` units at a time (GPT-NeoX's `[q, k, v]` per head, gpt-oss's gate and up
            neurons alternating), a block of one segment is plain.
        param (`str`, *optional*): the parameter of the module at `name` (`"gate_up_proj"`, `"down_proj"`) when the
            weight is a fused expert parameter; None for a module's `weight`.
        experts (`int`): the number of experts stacked along the parameter's first dim (0 for a plain weight).
        dim (`int`): the dim of the (per-expert) weight that `axis` indexes, for a fused expert parameter.
    """

    name: str
    axis: str
    groups: tuple[tuple[Segment, ...], ...]
    param: str | None = None
    experts: int = 0
    dim: int | None = None

    @property
    def key(self) -> str:
        """The name inside the layer, with the parameter for an expert weight (`"mlp.experts.gate_up_proj"`)."""
        return self.name if self.param is None else f"{self.name}.{self.param}"

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(s for group in self.groups for s in group)

    @property
    def roles(self) -> frozenset[str]:
        return frozenset().union(*(s.roles for s in self.segments))

    @property
    def size(self) -> int:
        return sum(s.rows for s in self.segments)

    def describe(self) -> str:
        return "; ".join(s.describe() for s in self.segments)

    def expand(self, values: Callable[[Segment], torch.Tensor]) -> torch.Tensor:
        """Per-row values from per-unit ones: `values(segment)` gives `[..., count]`, the result is `[..., size]`."""
        blocks = []
        for group in self.groups:
            if len(group) == 1:
                s = group[0]
                blocks.append(values(s).repeat_interleave(s.repeat, dim=-1))
                continue
            steps = group[0].count // group[0].step
            parts = []
            for s in group:
                v = values(s)  # [..., count]
                v = v.reshape(*v.shape[:-1], steps, s.step).repeat_interleave(s.repeat, dim=-1)
                parts.append(v)  # [..., steps, step * repeat]
            blocks.append(torch.cat(parts, dim=-1).flatten(-2))
        return torch.cat(blocks, dim=-1)


def plain(name: str, axis: str, *segments: Segment, param: str | None = None, experts: int = 0, dim=None):
    """A `ModuleLayout` whose segments are laid end to end."""
    return ModuleLayout(name, axis, tuple((s,) for s in segments), param, experts, dim)


def interleaved(name: str, axis: str, *segments: Segment, param: str | None = None, experts: int = 0, dim=None):
    """A `ModuleLayout` of one block whose segments alternate `step` units at a time."""
    steps = {s.count // s.step for s in segments}
    if len(steps) != 1 or any(s.count % s.step for s in segments):
        raise CoFiTuneError(f"interleaved segments of {name!r} do not line up: {[s.describe() for s in segments]}")
    return ModuleLayout(name, axis, (tuple(segments),), param, experts, dim)


@dataclass(frozen=True)
class Gate:
    """Where the importance estimator's gates of one block act.

    `kind="heads"`: the input of `module` (an attention output projection), viewed `[..., count, width]`, scaled per
    head `heads[first:first + count]`. `kind="ffn"`: the input of `module` (an FFN down projection) scaled per
    `intermediate[first:first + count]` and its output per `output[output_first:output_first + width]`.
    `kind="experts"`: the fused down parameter `param` of `module`, `[experts, ...]`, scaled along its intermediate
    dim by `expert_intermediate` and along its output dim by `expert_output` (a gate on a unit is a factor on that
    unit's weights, which works inside any fused expert kernel, and its gradient flows only through routed tokens).
    """

    kind: str
    module: str
    first: int = 0
    count: int = 0
    width: int = 0
    output_first: int = 0
    param: str | None = None
    experts: int = 0
    out_dim: int = 1  # for experts: the dim of the [experts, a, b] parameter that holds the outputs


@dataclass(frozen=True)
class LayerLayout:
    """What CoFiTune can train in one decoder layer, and the importance units it has.

    Args:
        index (`int`): the layer's index in the decoder-layer list.
        kinds (`tuple[str, ...]`): what the layer holds, for messages (`"attention"`, `"ffn"`, `"experts"`,
            `"mamba"`, `"linear_attention"`, ...).
        modules (`tuple[ModuleLayout, ...]`): the trainable weights.
        gates (`tuple[Gate, ...]`): the estimator's gate points.
        sizes (`dict[str, int]`): units per importance part in this layer (experts parts: units per expert).
        experts (`int`): routed experts in this layer (0: none).
        notes (`tuple[str, ...]`): what was found but is not trained, or why a block could not be read.
    """

    index: int
    kinds: tuple[str, ...]
    modules: tuple[ModuleLayout, ...] = ()
    gates: tuple[Gate, ...] = ()
    sizes: dict[str, int] = field(default_factory=dict)
    experts: int = 0
    notes: tuple[str, ...] = ()

    def module(self, key: str) -> ModuleLayout:
        for m in self.modules:
            if m.key == key:
                return m
        raise KeyError(key)

    def describe(self) -> str:
        return "+".join(self.kinds) if self.kinds else "nothing trainable"


@dataclass(frozen=True)
class ModelLayout:
    """The layout of every decoder layer of a model.

    Args:
        layers_path (`str`): the full name of the decoder-layer `ModuleList` (`"model.layers"`,
            `"model.language_model.layers"`).
        layers (`tuple[LayerLayout, ...]`): one per decoder layer.
        hidden (`int`): the hidden size.
        source (`str`): how the layout was obtained (`"inferred"`, `"table: ..."`, `"unit_map"`).
    """

    layers_path: str
    layers: tuple[LayerLayout, ...]
    hidden: int
    source: str = "inferred"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layers_pattern(self) -> str:
        """The attribute name of the decoder-layer list (`"layers"`, `"h"`), PEFT's `layers_pattern`."""
        return self.layers_path.rsplit(".", 1)[-1]

    def key(self, layer: int, name: str) -> str:
        return f"{self.layers_path}.{layer}.{name}" if self.layers_path else f"{layer}.{name}"

    def widths(self) -> dict[str, int]:
        """The widest layer's units per part (an importance part is `[layers, widest]`, narrower layers padded)."""
        out: dict[str, int] = {}
        for layer in self.layers:
            for part, n in layer.sizes.items():
                out[part] = max(out.get(part, 0), n)
        return out

    def experts(self) -> int:
        return max((layer.experts for layer in self.layers), default=0)

    def has(self, kind: str) -> bool:
        return any(kind in layer.kinds for layer in self.layers)


def param_owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    """`(owner, name)` of parameter `dotted` (`"gate_up_proj"` or `"mlp.w1"`) of `module`."""
    path, _, name = dotted.rpartition(".")
    return (module.get_submodule(path) if path else module), name


def full_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's full shape, also under DeepSpeed ZeRO-3 `zero.Init` (empty local tensor) and for bitsandbytes 4-bit
    weights (packed bytes)."""
    return _compat.weight_shape(weight)


def base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(base_of(module), Conv1D)


def weight_axis(module: nn.Module, axis: str) -> int:
    """The dim of `module.weight` that holds output (`axis="out"`) or input (`"in"`) features."""
    out_dim = 1 if is_conv1d(module) else 0
    return out_dim if axis == "out" else 1 - out_dim


def check_wrappable(key: str, module: nn.Module) -> None:
    """Raise `CoFiTuneError` unless `module` is an `nn.Linear`/`Conv1D` with a floating-point or bitsandbytes weight."""
    library = _compat.quantization_of(module)
    if library is not None and library not in (_compat.BNB_4BIT, _compat.BNB_8BIT):
        raise CoFiTuneError(_compat.unsupported_quantization_message(key, module, library))
    if not isinstance(module, nn.Linear) and not isinstance(module, Conv1D):
        raise CoFiTuneError(
            f"module {key!r} is a {type(module).__name__}; CoFiTune trains `nn.Linear` and GPT-2 style `Conv1D` "
            "modules (plain floating-point, or bitsandbytes 4-bit/8-bit) and fused expert parameters only."
        )
