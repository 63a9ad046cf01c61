"""Reading the fused expert weights of a mixture-of-experts block (transformers >= 5 stores each as one parameter).

A block's expert weights are grouped by their number of experts (routed experts apart from 3-D shared experts of one
expert), their roles read from their names (`gate_up_proj`, `up_proj`, `down_proj`, JetMoE's `input_linear`/
`output_linear`, DBRX's `w1`/`v1`/`w2`), and their orientation from their shapes (`[experts, out, in]`, or
`[experts, in, out]` for transposed layouts such as gpt-oss), with the experts module's own `is_transposed` and
`is_concatenated` flags (transformers' `use_experts_implementation`) where the shapes cannot tell.
"""

from __future__ import annotations

from torch import nn

from . import table
from .blocks import Block, Unreadable, check, unwrap
from .config_read import EXPERTS, first_int, read
from .layout import EXPERT_PARTS, Gate, full_shape, interleaved, plain, seg

EXPERT_ROLES = {
    **dict.fromkeys(("gate_up_proj", "input_linear", "w13", "gate_up"), "gate_up"),
    **dict.fromkeys(("up_proj", "w3", "v1"), "up"),
    **dict.fromkeys(("gate_proj", "w1"), "gate"),
    **dict.fromkeys(("down_proj", "output_linear", "w2"), "down"),
}


def read_experts(block: Block, cfg, hidden: int, first: int, first_out: int) -> tuple[list, Gate, int, int]:
    """`(module layouts, gate, experts, intermediate units per expert)` of one block's fused expert weights."""
    weights = {}
    for owner, params in block.experts.items():
        for pname, param in params.items():
            role = EXPERT_ROLES.get(pname if pname != "weight" else owner.rsplit(".", 1)[-1])
            if role is None:
                continue
            if role in weights:
                raise Unreadable(f"two {role} expert weights ({weights[role][0]}.{weights[role][1]}, {owner}.{pname})")
            weights[role] = (owner, pname, param)
    if "down" not in weights or not ({"up", "gate_up"} & set(weights)):
        raise Unreadable(f"expert weights {sorted(weights)} lack a down or an up projection")
    owner, pname, param = weights["down"]
    shape = _shape3(block, owner, pname, param, cfg)
    experts = shape[0]
    transposed = read(unwrap(_owner(block, owner)), "is_transposed")
    fallback = (2 if transposed else 1) if isinstance(transposed, bool) else None
    out_dim = _unit_dim(shape, hidden, fallback, down=True, what=f"{owner}.{pname}")
    inter = shape[3 - out_dim]
    shared = experts == 1
    part_i, part_o = ("intermediate", "output") if shared else EXPERT_PARTS
    fi, fo = (first, first_out) if shared else (0, 0)
    mods = []
    wrap = _wrap_target(block, owner)
    for role, (own, pn, p) in weights.items():
        pshape = _shape3(block, own, pn, p, cfg, experts)
        name, pn = wrap(own, pn)
        if role == "down":
            mods.append(plain(name, "out", seg("down", part_o, fo, hidden), param=pn, experts=experts, dim=out_dim))
            continue
        dim = _unit_dim(pshape, hidden, fallback, down=False, what=f"{own}.{pn}")
        units = (seg("gate", part_i, fi, inter), seg("up", part_i, fi, inter))
        if role == "gate_up":
            check(pshape[dim], 2 * inter, f"{own}.{pn} rows (gate and up of {inter} units)")
            concatenated = read(unwrap(_owner(block, own)), "is_concatenated")
            build = interleaved if concatenated is False else plain
            mods.append(build(name, "out", *units, param=pn, experts=experts, dim=dim))
        else:
            check(pshape[dim], inter, f"{own}.{pn} rows ({inter} units)")
            mods.append(plain(name, "out", seg(role, part_i, fi, inter), param=pn, experts=experts, dim=dim))
    down_name, down_param = wrap(owner, pname)
    kind = "shared_experts" if shared else "experts"
    gate = Gate(kind, down_name, fi, inter, hidden, fo, param=down_param, experts=experts, out_dim=out_dim)
    return mods, gate, experts, inter


def _wrap_target(block: Block, owner: str):
    """Where the tuner layer goes: on the module that owns the weights, or, for modules whose parent reads the weights
    off them directly (DBRX's `experts.mlp.w1`), on the parent (the parameter named by its path inside it)."""

    def wrap(own: str, pname: str) -> tuple[str, str]:
        own = own or block.path
        if type(unwrap(_owner(block, own))).__name__ in table.FOLDED_EXPERTS and "." in own:
            parent, child = own.rsplit(".", 1)
            return parent, f"{child}.{pname}"
        return own, pname

    return wrap


def _shape3(block: Block, owner: str, pname: str, param, cfg, experts: int | None = None) -> tuple[int, int, int]:
    """A fused expert weight's shape as `[experts, a, b]` (DBRX folds the experts into its rows)."""
    shape = tuple(full_shape(param))
    if len(shape) == 3:
        return shape
    experts = experts or first_int(unwrap(_owner(block, owner)), ("moe_num_experts", "num_experts"))
    experts = experts or first_int(cfg, EXPERTS)
    if not experts or shape[0] % experts:
        raise Unreadable(f"{owner}.{pname} folds an unknown number of experts into {shape[0]} rows")
    return (experts, shape[0] // experts, shape[1])


def _unit_dim(shape, hidden: int, fallback: int | None, down: bool, what: str) -> int:
    """The dim of an `[experts, a, b]` weight that holds its output features."""
    a, b = shape[1], shape[2]
    if a != b:
        if down and hidden in (a, b):
            return 1 if a == hidden else 2
        if not down and hidden in (a, b):
            return 1 if b == hidden else 2
    elif fallback is not None:
        return fallback
    raise Unreadable(f"cannot tell the output dim of expert weight {what} {tuple(shape)} (hidden size {hidden})")


def _owner(block: Block, owner: str) -> nn.Module:
    module = unwrap(block.module)
    rel = owner[len(block.path) + 1 :] if block.path and owner.startswith(block.path + ".") else owner
    if not rel or rel == block.path:
        return module
    for part in rel.split("."):  # look through tuner layers wrapped around modules on the way
        module = unwrap(module)._modules[part]
    return module


def expert_groups(block: Block, cfg) -> list[Block]:
    """The block's expert weights split by number of experts (routed experts apart from 3-D shared experts)."""
    by_count: dict[int, Block] = {}
    for owner, params in block.experts.items():
        for pname, param in params.items():
            try:
                count = _shape3(block, owner, pname, param, cfg)[0]
            except Unreadable:
                count = 0
            group = by_count.setdefault(count, Block("ffn", block.path, block.module))
            group.experts.setdefault(owner, {})[pname] = param
    return list(by_count.values())
