"""The exceptions: layouts that cannot be read from a model's module names and weight shapes.

Everything else is inferred (`infer.py`). An entry here exists only where the shapes are the same as an inferred
layout's but the rows mean something else, so inference would silently mask the wrong rows; each entry has a test
(`tests/test_architecture_table.py`) that perturbs the rows the inferred layout gives a head and shows that the change
lands in other heads, and that the entry's layout keeps it in that head. Entries are keyed by the class name of the
attention (or experts) module, not by `model_type`, so a model that reuses the module (Fuyu's Persimmon layers) is
covered too.
"""

from __future__ import annotations

from torch import nn

from .config_read import read
from .layout import Segment, seg

#: Fused query/key/value projections whose rows are laid out per head as `[q, k, v]` (`view(..., heads, 3 *
#: head_dim)`), where inference would assume all queries, then all keys, then all values.
PER_HEAD_QKV = frozenset({"GPTNeoXAttention", "GPTNeoXJapaneseAttention", "BloomAttention", "PersimmonAttention"})

#: Query projections that hold, per head, the query and an output gate (`view(..., heads, 2 * head_dim)` then
#: `chunk(2)`): Qwen3-Next's gated attention and the models built on it, MiniCPM5's `q_gate_proj`, and A.X-K2's
#: latent attention (`q_gate_proj`: per head the query, then a gate as wide as a value head).
GATED_QUERY = frozenset(
    {
        "Qwen3NextAttention", "Qwen3_5Attention", "Qwen3_5MoeAttention", "Qwen4ExpTextAttention",
        "MiniCPM5MoeAttention", "AXK2Attention",
    }
)  # fmt: skip


def fused_qkv(cls: str, module: nn.Module, heads: int, kv_heads: int, head_dim: int, first: int):
    """The groups of a fused query/key/value projection of attention class `cls`, or None to infer them.

    Returns `(groups, reason)`: `groups` as in `ModuleLayout.groups`, `reason` a short note for the layout's source.
    """
    group = heads // kv_heads
    if cls in PER_HEAD_QKV:
        segments = (
            seg("q", "heads", first, heads, head_dim),
            seg("k", "heads", first, heads, head_dim),
            seg("v", "heads", first, heads, head_dim),
        )
        return (segments,), f"{cls}: q, k, v interleaved per head"
    if cls == "FalconAttention":
        if read(module, "new_decoder_architecture"):
            # per key/value group: that group's queries, then its key and its value
            segments = (
                seg("q", "heads", first, heads, head_dim, step=group),
                seg("k", "heads", first, kv_heads, head_dim, group=group),
                seg("v", "heads", first, kv_heads, head_dim, group=group),
            )
            return (segments,), "FalconAttention (new decoder architecture): queries, key, value per key/value group"
        if not read(module, "multi_query"):
            segments = (
                seg("q", "heads", first, heads, head_dim),
                seg("k", "heads", first, heads, head_dim),
                seg("v", "heads", first, heads, head_dim),
            )
            return (segments,), "FalconAttention: q, k, v interleaved per head"
        return None, ""
    if cls == "CodeGenAttention":
        chunks = read(module, "mp_num") or 4
        per = heads // chunks
        # view(..., mp_num, 3 * local_dim) then split into query, VALUE, key within each chunk
        segments = (
            seg("q", "heads", first, heads, head_dim, step=per),
            seg("v", "heads", first, heads, head_dim, step=per),
            seg("k", "heads", first, heads, head_dim, step=per),
        )
        return (segments,), f"CodeGenAttention: {chunks} chunks of [q, v, k]"
    return None, ""


def gated_query(cls: str, heads: int, head_dim: int, first: int) -> Segment | None:
    """The query projection of a gated-attention class: `2 * head_dim` rows per head (query, then its gate)."""
    if cls in GATED_QUERY:
        return seg("q", "heads", first, heads, 2 * head_dim)
    return None


#: Expert modules that keep each weight as a 2-D parameter with the experts folded into the rows, `[experts *
#: intermediate, hidden]`: DBRX's `w1` (gate), `v1` (up) and `w2` (down, used as `x @ w2`, i.e. transposed).
FOLDED_EXPERTS = {"DbrxExpertGLU": {"w1": "gate", "v1": "up", "w2": "down"}}


#: Models whose decoder layers are reversible: their forward runs without autograd and is recomputed in backward, so
#: a trained module inside them gets a gradient only when the layers' input requires grad (Reformer).
REVERSIBLE = frozenset({"reformer"})


def runs_layers_outside_autograd(model: nn.Module) -> bool:
    """Whether `model`'s decoder layers are reversible (see `REVERSIBLE`)."""
    from .config_read import model_type_of

    return model_type_of(model) in REVERSIBLE
