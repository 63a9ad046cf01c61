"""Reading a model's layout from its modules: attention projections, FFNs and fused experts, checked against shapes.

Head counts come from the attention module or the layer's config (`config.per_layer_config[i]` for heterogeneous
configs); every width is then read off the weights and checked for consistency (queries `heads * head_dim` rows, keys
and values `kv_heads * head_dim`, the output projection `heads * v_head_dim` columns), so a guess that does not fit
the weights is refused, never trained. Fused layouts whose shapes cannot tell their order come from `table.py`.
"""

from __future__ import annotations

from torch import nn

from .. import _compat
from ..errors import CoFiTuneError
from . import table
from .blocks import Block, Unreadable, check, find_blocks, linear_dims, loose_ffn, model_prefix, unwrap
from .config_read import HEADS, HIDDEN, first_int, layer_config, model_config, model_type_of, read
from .layout import Gate, LayerLayout, ModelLayout, full_shape, interleaved, plain, seg
from .locate import find_decoder_layers
from .moe import expert_groups, read_experts

ATTN_ROLES = {
    **dict.fromkeys(("q_proj", "query", "q", "wq", "query_proj", "q_lin", "project_q"), "q"),
    **dict.fromkeys(("k_proj", "key", "k", "wk", "key_proj", "k_lin", "project_k"), "k"),
    **dict.fromkeys(("v_proj", "value", "v", "wv", "value_proj", "v_lin", "project_v"), "v"),
    **dict.fromkeys(("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out_lin", "attention_out", "proj"), "o"),
    **dict.fromkeys(("qkv_proj", "query_key_value", "c_attn", "wqkv", "qkv", "w_pack"), "qkv"),
    "query_key": "qk", "q_a_proj": "q_a", "q_b_proj": "q_b", "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv_b",
    "q_gate_proj": "q_gate",
}  # fmt: skip
FFN_DOWN = {"down_proj", "fc2", "c_proj", "dense_4h_to_h", "fc_out", "w2", "wo", "w_out", "proj_down", "output_linear",
            "layer_2", "lin2", "linear_fc2", "down", "fc_2", "value", "output"}  # fmt: skip
FFN_GATE = {"gate_proj", "w1", "w_0", "proj_up_gate", "wi_0", "gate", "fc_gate"}
ROUTERS = ("gate", "router", "shared_expert_gate", "wg", "classifier", "switch")


def _role_name(path: str) -> str:
    parts = path.split(".")
    last = parts[-1]
    if last in ("linear", "base_layer") and len(parts) > 1:
        last = parts[-2]
    return last.lower()


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _exact(value: int, by: int, what: str) -> int:
    if by <= 0 or value % by:
        raise Unreadable(f"{what}: {value} is not a multiple of {by}")
    return value // by


def _heads(module: nn.Module, cfg) -> int | None:
    found = first_int(module, ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_attn_heads"))
    return found or first_int(read(module, "config"), HEADS) or first_int(cfg, HEADS)


def _kv_heads(module: nn.Module, heads: int) -> int | None:
    found = first_int(module, ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_heads"))
    if found:
        return found
    groups = first_int(module, ("num_key_value_groups",))
    return heads // groups if groups and heads % groups == 0 else None


def read_attention(block: Block, cfg, first: int) -> tuple[list, Gate, int, str]:
    """`(module layouts, head gate, heads, table note)` of one attention block."""
    if block.experts:
        raise Unreadable("its projections are experts (a mixture of attention heads)")
    module = unwrap(block.module)
    cls = type(module).__name__
    found: dict[str, tuple[str, nn.Module]] = {}
    for path, lin in block.linears.items():
        role = ATTN_ROLES.get(_role_name(path))
        if role is None:
            continue
        if role in found:
            raise Unreadable(f"two {role!r} projections ({found[role][0]}, {path})")
        found[role] = (path, lin)
    if not block.linears:
        params = sorted(n for n, _ in module.named_parameters(recurse=False))
        raise Unreadable(f"no Linear projections (its weights are raw parameters {params})")
    heads = _heads(module, cfg)
    if heads is None:
        raise Unreadable("neither the module nor the config gives a head count")
    if "o" not in found:
        raise Unreadable(f"no output projection among {sorted(block.linears)}")
    full = lambda p: p  # noqa: E731  (the block's linears are named by their path inside the layer)
    o_path, o = found["o"]
    head_v = _exact(linear_dims(o)[0], heads, f"{o_path} input features for {heads} heads")
    if {"q_a", "q_b", "kv_a", "kv_b"} & set(found):
        mods = _mla(found, full, cls, heads, head_v, first)
        note = f"table: {cls} query rows hold a gate per head" if "q_gate" in found else ""
    elif "qkv" in found:
        mods, note = _fused_qkv(found, full, module, cls, heads, head_v, first)
    else:
        mods, note = _separate_qkv(found, full, module, cls, heads, head_v, first)
    mods.append(plain(full(o_path), "in", seg("o", "heads", first, heads, head_v)))
    return mods, Gate("heads", full(o_path), first, heads, head_v), heads, note


def _separate_qkv(found, full, module, cls, heads, head_v, first):
    query = found.get("q") or found.get("qk") or found.get("q_gate")
    missing = [
        r for r, ok in (("query", query), ("value", "v" in found), ("key", "k" in found or "qk" in found)) if not ok
    ]
    if missing:
        raise Unreadable(f"no {' or '.join(missing)} projection (found {sorted(found)})")
    q_out = linear_dims(query[1])[1]
    v_path, v = found["v"]
    v_out = linear_dims(v)[1]
    kv = _kv_heads(module, heads) or _exact(v_out, head_v, f"{v_path} output features for head dim {head_v}")
    gated = cls in table.GATED_QUERY
    if "q_gate" in found and not gated:
        raise Unreadable(f"a fused query-and-gate projection {found['q_gate'][0]} of a layout not in the table")
    head_qk = _exact(q_out, heads * (2 if gated else 1), f"{query[0]} output features for {heads} heads")
    if "k" in found:
        k_path, k = found["k"]
        check(linear_dims(k)[1], kv * head_qk, f"{k_path} output features ({kv} key heads x {head_qk})")
    check(v_out, kv * head_v, f"{v_path} output features ({kv} value heads x {head_v})")
    if heads % kv:
        raise Unreadable(f"{heads} query heads do not split into {kv} key/value heads")
    group = heads // kv
    q_roles = ("q", "k") if "qk" in found else "q"
    q_seg = table.gated_query(cls, heads, head_qk, first) or seg(q_roles, "heads", first, heads, head_qk)
    mods = [plain(full(query[0]), "out", q_seg)]
    if "k" in found:
        mods.append(plain(full(found["k"][0]), "out", seg("k", "heads", first, kv, head_qk, group=group)))
    mods.append(plain(full(v_path), "out", seg("v", "heads", first, kv, head_v, group=group)))
    return mods, (f"table: {cls} query rows hold a gate per head" if gated else "")


def _fused_qkv(found, full, module, cls, heads, head_v, first):
    path, lin = found["qkv"]
    total = linear_dims(lin)[1]
    kv = _exact(total - heads * head_v, 2 * head_v, f"{path} output features beyond the {heads} query heads")
    known = _kv_heads(module, heads)
    if known is not None and known != kv:
        raise Unreadable(f"{path} has {total} output features, which fits {kv} key/value heads, not {known}")
    if kv == 0 or heads % kv:
        raise Unreadable(f"{heads} query heads do not split into {kv} key/value heads")
    groups, note = table.fused_qkv(cls, module, heads, kv, head_v, first)
    if groups is None:
        group = heads // kv
        segments = (
            seg("q", "heads", first, heads, head_v),
            seg("k", "heads", first, kv, head_v, group=group),
            seg("v", "heads", first, kv, head_v, group=group),
        )
        return [plain(full(path), "out", *segments)], ""
    from .layout import ModuleLayout

    return [ModuleLayout(full(path), "out", groups)], f"table: {note}"


def _mla(found, full, cls, heads, head_v, first):
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank query and key/value projections, read as such."""
    missing = [r for r in ("kv_a", "kv_b") if r not in found]
    if missing or not ({"q", "q_b", "q_gate"} & set(found)):
        raise Unreadable(
            f"a latent-attention layout without {missing or ['a query projection']} (found {sorted(found)})"
        )
    if "q_gate" in found and cls not in table.GATED_QUERY:
        raise Unreadable(f"a fused query-and-gate projection {found['q_gate'][0]} of a layout not in the table")
    kv_b_path, kv_b = found["kv_b"]
    rank, kv_b_out = linear_dims(kv_b)
    nope = _exact(kv_b_out, heads, f"{kv_b_path} output features for {heads} heads") - head_v
    kv_a_path, kv_a = found["kv_a"]
    rope = linear_dims(kv_a)[1] - rank
    if nope <= 0 or rope < 0:
        raise Unreadable(f"{kv_b_path}/{kv_a_path} widths do not fit {heads} heads of value size {head_v}")
    q_path, q = found.get("q_b") or found.get("q") or found["q_gate"]
    per_head = nope + rope + (head_v if "q_gate" in found else 0)  # a fused gate: each head's query, then its gate
    check(linear_dims(q)[1], heads * per_head, f"{q_path} output features ({heads} heads x {per_head})")
    mods = []
    if "q_a" in found:
        qa_path, qa = found["q_a"]
        mods.append(plain(full(qa_path), "out", seg("q", None, count=linear_dims(qa)[1])))
    mods.append(plain(full(q_path), "out", seg("q", "heads", first, heads, per_head)))
    latent = [seg(("k", "v"), None, count=rank)] + ([seg("k", None, count=rope)] if rope else [])
    mods.append(plain(full(kv_a_path), "out", *latent))
    mods.append(
        interleaved(
            full(kv_b_path), "out", seg("k", "heads", first, heads, nope), seg("v", "heads", first, heads, head_v)
        )
    )
    return mods


def read_ffn(block: Block, hidden: int, first: int, first_out: int) -> tuple[list, Gate, int]:
    """`(module layouts, gate, intermediate units)` of the dense linears of an FFN block."""
    rel = {
        p[len(block.path) + 1 :] if block.path and p.startswith(block.path + ".") else p: m
        for p, m in block.linears.items()
    }
    if block.experts:  # a MoE block: its router and shared-expert gate are not FFN projections
        rel = {p: m for p, m in rel.items() if p.split(".")[0] not in ROUTERS and "router" not in p}
    dims = {p: linear_dims(m) for p, m in rel.items()}
    downs = [p for p in rel if _role_name(p) in FFN_DOWN and dims[p][1] == hidden]
    if len(downs) != 1:
        downs = [p for p in rel if dims[p][1] == hidden and dims[p][0] != hidden]
    if len(downs) != 1:
        raise Unreadable(f"no single down projection (to {hidden} features) among {sorted(rel)}")
    down = downs[0]
    inter = dims[down][0]
    ins = [p for p in rel if p != down and dims[p][0] == hidden]
    fused = [p for p in ins if dims[p][1] == 2 * inter]
    single = [p for p in ins if dims[p][1] == inter]
    full = lambda p: _join(block.path, p)  # noqa: E731
    mods = []
    if len(fused) == 1 and not single:  # gate rows first: `gate, up = proj(x).chunk(2)` (Phi-3, GLM, ...)
        mods.append(
            plain(
                full(fused[0]),
                "out",
                seg("gate", "intermediate", first, inter),
                seg("up", "intermediate", first, inter),
            )
        )
    elif len(single) == 2:
        gates = [p for p in single if _role_name(p) in FFN_GATE]
        if len(gates) != 1:
            raise Unreadable(
                f"two input projections {single} of {inter} features; cannot tell the gate from the up one"
            )
        up = next(p for p in single if p != gates[0])
        mods.append(plain(full(gates[0]), "out", seg("gate", "intermediate", first, inter)))
        mods.append(plain(full(up), "out", seg("up", "intermediate", first, inter)))
    elif len(single) == 1 and not fused:
        if _role_name(single[0]) in FFN_GATE:
            raise Unreadable(f"a gate projection {single[0]} without an up projection among {sorted(rel)}")
        mods.append(plain(full(single[0]), "out", seg("up", "intermediate", first, inter)))
    else:
        raise Unreadable(f"no input projection of {inter} (or {2 * inter}) features among {sorted(rel)}")
    mods.append(plain(full(down), "out", seg("down", "output", first_out, hidden)))
    return mods, Gate("ffn", full(down), first, inter, hidden, first_out), inter


def infer_layer(
    index: int, layer: nn.Module, cfg, hidden: int, tied: set[int], prefix: str = "", class_prefix: str = ""
) -> tuple[LayerLayout, list[str]]:
    """The layout of decoder layer `index` (`prefix`: the layer list's name, for messages; `class_prefix`: the model's
    class-name prefix), and the table entries it used. A projection quantized by a library CoFiTune cannot train is
    refused by name."""
    blocks, loose = find_blocks(layer, class_prefix)
    if any(b.kind == "cross_attention" for b in blocks) and not any(
        b.kind not in ("cross_attention", "ffn") for b in blocks
    ):  # a layer that only attends to an encoder's (or vision tower's) states; it is skipped without them
        note = f"a cross-attention layer ({', '.join(b.path for b in blocks if b.kind == 'cross_attention')}); not trained"
        return LayerLayout(index, ("cross_attention",), notes=(note,)), []
    for block in blocks:
        for path, module in block.linears.items():
            library = _compat.quantization_of(_base(module))
            if library is not None and library not in (_compat.BNB_4BIT, _compat.BNB_8BIT):
                key = f"{prefix}.{index}.{path}" if prefix else f"{index}.{path}"
                raise CoFiTuneError(_compat.unsupported_quantization_message(key, _base(module), library))
    extra = loose_ffn(loose)
    if extra is not None:
        blocks.append(extra)
    kinds: list[str] = []
    modules, gates, notes, used = [], [], [], []
    sizes = dict.fromkeys(("heads", "intermediate", "output"), 0)
    experts = 0
    for block in blocks:
        if block.kind == "ffn" and not block.linears and not block.experts:
            continue  # a wrapper whose FFN is a nested block of its own
        note = _tied(block, tied)
        if note:
            notes.append(note)
            kinds.append(f"{block.kind} (tied)")
            continue
        cls = type(unwrap(block.module)).__name__ if block.module is not None else "layer-level linears"
        try:
            if block.kind == "attention":
                mods, gate, heads, note = read_attention(block, cfg, sizes["heads"])
                sizes["heads"] += heads
                used += [note] if note else []
                kinds.append("attention")
            elif block.kind == "ffn":
                mods, block_gates, block_kind, e = _read_ffn_block(block, cfg, hidden, sizes)
                if e:
                    if experts:
                        raise Unreadable("a second group of routed experts in one layer")
                    experts = e
                gate = None
                gates.extend(block_gates)
                kinds.append(block_kind)
            elif block.kind == "cross_attention":
                notes.append(f"{block.path} ({cls}) attends to an encoder's output; not trained")
                continue
            else:  # a sequence mixer other than softmax attention
                kinds.append(block.kind)
                continue
        except Unreadable as err:
            kinds.append(f"{block.kind} (unread)")
            notes.append(f"{block.kind} {block.path or '(layer)'} ({cls}): {err}")
            continue
        modules.extend(mods)
        if gate is not None:
            gates.append(gate)
    if loose:
        notes.append(f"linears {sorted(loose)} belong to no attention or FFN block; not trained")
    if experts:
        sizes["expert_output"] = hidden
    sizes = {k: v for k, v in sizes.items() if v}
    return LayerLayout(index, tuple(kinds), tuple(modules), tuple(gates), sizes, experts, tuple(notes)), used


def _tied(block: Block, tied: set[int]) -> str | None:
    """A note when some weight of the block is also used by another decoder layer (weights tied across layers)."""
    weights = [getattr(_base(m), "weight", None) for m in block.linears.values()]
    weights += [p for params in block.experts.values() for p in params.values()]
    if any(w is not None and id(w) in tied for w in weights):
        return (
            f"{block.kind} {block.path} shares its weights with other decoder layers (tied); not trained, since a "
            "delta per layer would untie them and merging could not reproduce the adapted model"
        )
    return None


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def tied_weights(layer_list) -> set[int]:
    """Ids of the parameters that more than one decoder layer uses."""
    counts: dict[int, int] = {}
    for layer in layer_list:
        for pid in {id(p) for p in layer.parameters()}:
            counts[pid] = counts.get(pid, 0) + 1
    return {pid for pid, n in counts.items() if n > 1}


def _read_ffn_block(block: Block, cfg, hidden: int, sizes: dict) -> tuple[list, list, str, int]:
    mods, gates, experts, kind = [], [], 0, "ffn"
    for group in expert_groups(block, cfg):
        emods, gate, e, inter = read_experts(group, cfg, hidden, sizes["intermediate"], sizes["output"])
        mods += emods
        gates.append(gate)
        if e > 1:
            if experts:
                raise Unreadable("two groups of routed experts in one block")
            experts, kind = e, "experts"
            sizes["expert_intermediate"] = inter
        else:
            sizes["intermediate"] += inter
            sizes["output"] += hidden
    rest = dict(block.linears)
    if block.experts:
        rel = lambda p: p[len(block.path) + 1 :] if block.path else p  # noqa: E731
        rest = {p: m for p, m in rest.items() if rel(p).split(".")[0] not in ROUTERS and "router" not in rel(p)}
    if rest:
        dense = Block("ffn", block.path, block.module, rest, {})
        dmods, gate, inter = read_ffn(dense, hidden, sizes["intermediate"], sizes["output"])
        sizes["intermediate"] += inter
        sizes["output"] += hidden
        mods += dmods
        gates.append(gate)
    return mods, gates, kind, experts


def infer_layout(model: nn.Module, layers_pattern: str | None = None) -> ModelLayout:
    """The `ModelLayout` of `model`, read from its modules; a `CoFiTuneError` for a model with nothing to train."""
    path, layer_list = find_decoder_layers(model, layers_pattern)
    cfg = model_config(model)
    hidden = first_int(cfg, HIDDEN)
    if hidden is None:
        embeddings = read(model, "get_input_embeddings")
        try:
            hidden = int(full_shape(embeddings().weight)[1])
        except Exception as err:
            raise CoFiTuneError(
                f"cannot read the hidden size of this {type(model).__name__} from its config or input embeddings."
            ) from err
    tied = tied_weights(layer_list)
    layers, used = [], []
    for i, layer in enumerate(layer_list):
        layout, notes = infer_layer(i, layer, layer_config(cfg, i), hidden, tied, path, model_prefix(model))
        layers.append(layout)
        used += [n for n in notes if n not in used]
    result = ModelLayout(path, tuple(layers), hidden, "; ".join(["inferred", *used]))
    if not any(layer.modules for layer in result.layers):
        kinds = sorted({k for layer in result.layers for k in layer.kinds} or {"nothing CoFiTune recognises"})
        notes = sorted({n for layer in result.layers for n in layer.notes})
        raise CoFiTuneError(
            f"model_type {model_type_of(model)!r} ({type(model).__name__}) has no attention or feed-forward layer that "
            f"CoFiTune can train: its decoder layers ({path}) hold {', '.join(kinds)}"
            + (f" ({'; '.join(notes[:3])})" if notes else "")
            + ". CoFiTune's units are attention heads and FFN neurons; a model without them (a pure state-space or "
            "recurrent model) is not supported. If its layers do have such modules under other names, describe them "
            "with `unit_map` (module name inside a layer -> unit)."
        )
    return result
