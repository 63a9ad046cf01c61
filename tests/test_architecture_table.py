"""Each entry of the table of exceptions (`cofitune_peft/architectures/table.py`), with the reason it exists.

For every entry: with the entry, the layout passes the probes (`tests/probes.py`: a head's rows change only that
head, a unit's rows only that unit); without it, inference either reads the same shapes in the wrong order (the probes
show changes landing in other heads) or refuses. So inference cannot be right there, and the entry is needed.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from probes import probe_layer
from sweep import _model

from cofitune_peft import CoFiTuneError
from cofitune_peft.architectures import infer_layout, table

IDS = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def _probe(model, layout) -> list[str]:
    return [p for i in range(layout.num_layers) for p in probe_layer(model, layout, i, IDS)]


def _without_table():
    return mock.patch.multiple(
        table,
        fused_qkv=lambda *args: (None, ""),
        GATED_QUERY=frozenset(),
        FOLDED_EXPERTS={},
    )


@pytest.mark.parametrize(
    ("family", "overrides", "entry"),
    [
        ("gpt_neox", {}, "GPTNeoXAttention"),  # view(..., heads, 3 * head_dim): [q, k, v] per head
        ("gpt_neox_japanese", {}, "GPTNeoXJapaneseAttention"),
        ("bloom", {}, "BloomAttention"),
        ("persimmon", {}, "PersimmonAttention"),
        ("fuyu", {}, "PersimmonAttention"),  # Fuyu's text decoder reuses Persimmon's layers
        ("codegen", {}, "CodeGenAttention"),  # mp_num chunks of [q, v, k]
        ("falcon", {"new_decoder_architecture": True}, "FalconAttention"),  # per key/value group: queries, k, v
        ("falcon", {"multi_query": False, "num_kv_heads": 4}, "FalconAttention"),  # [q, k, v] per head
    ],
)
def test_fused_qkv_whose_order_shapes_cannot_tell(family, overrides, entry):
    from families import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()
    layout = infer_layout(model)
    assert entry in layout.source and not _probe(model, layout)
    with _without_table():
        wrong = infer_layout(model)
    assert wrong.source == "inferred"  # the shapes fit a plain [q | k | v] ...
    problems = _probe(model, wrong)
    assert problems and "changed heads" in problems[0]  # ... but a "head" then spans several heads


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_text", "minicpm5_moe", "axk2"])
def test_gated_queries_per_head(family):
    model = _model(family)  # q rows per head: the query, then an output gate (`chunk(2)` of a per-head view)
    layout = infer_layout(model)
    assert "query rows hold a gate per head" in layout.source and not _probe(model, layout)
    with _without_table():
        unread = infer_layout(model)  # twice the query rows: inference refuses to guess their order
    assert not any("attention" in layer.kinds for layer in unread.layers)
    assert any(note.startswith("attention") for layer in unread.layers for note in layer.notes)


def test_dbrx_folded_experts_are_read_through_the_table():
    model = _model("dbrx")  # w1/v1/w2 of shape [experts * units, hidden], read off `experts.mlp` by its parent
    layout = infer_layout(model)
    keys = {m.key for m in layout.layers[0].modules}
    assert {"ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2"} <= keys
    with _without_table():
        plain = infer_layout(model)
    assert not any(m.param for layer in plain.layers for m in layer.modules)  # no experts found without the entry
    with pytest.raises(CoFiTuneError):
        from peft import get_peft_model

        from cofitune_peft import CoFiTuneConfig

        with _without_table():
            get_peft_model(_model("dbrx"), CoFiTuneConfig(parts="ffn", layers=(0, 4)))


def test_reformer_is_reversible():
    from cofitune_peft.architectures.table import runs_layers_outside_autograd

    # its layers run forward without autograd and recompute it in backward: the deltas need a grad-requiring input
    assert runs_layers_outside_autograd(_model("reformer")) and not runs_layers_outside_autograd(_model("llama"))
