"""The soft mask: invariants under AdamW and SGD, and the unit -> row mapping of every layout."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from tiny_models import batch, tiny_model

from cofitune_peft import CoFiTuneConfig, Importance
from cofitune_peft.architectures import base_of, model_layout, weight_axis
from cofitune_peft.importance import kv_head_importance, module_scale, normalize

L, H, KV, HD, D, INTER = 8, 4, 2, 8, 32, 48


def effective(pm, key):
    """The weight the model computes with: W0 + scale * delta."""
    layer = pm.get_submodule(key)
    return (layer.get_base_layer().weight + layer.get_delta_weight("default")).detach().clone()


def run(pm, steps=20, lr=1e-3, optimizer="adamw", weight_decay=0.0):
    params = [p for p in pm.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=1e-12)
    else:
        opt = torch.optim.SGD(params, lr=lr)
    pm.train()
    for step in range(steps):
        x = batch(step, size=4)
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()


UP = "base_model.model.model.layers.2.mlp.up_proj"
DOWN = "base_model.model.model.layers.2.mlp.down_proj"


def imp_with(values: dict[int, float]) -> Importance:
    inter = torch.zeros(L, INTER)
    for unit, value in values.items():
        inter[2, unit] = value
    return Importance(intermediate=inter, output=torch.zeros(L, D), normalized=True)


def test_zero_importance_equals_plain_selective_finetuning():
    # reference: train the up/down weights of layers 2..3 directly, everything else frozen
    ref = tiny_model()
    for n, p in ref.named_parameters():
        p.requires_grad = any(f"layers.{i}.mlp.{m}" in n for i in (2, 3) for m in ("up_proj", "down_proj"))
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0, eps=1e-12)
    ref.train()
    for step in range(20):
        x = batch(step, size=4)
        ref(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    zero = Importance(intermediate=torch.zeros(L, INTER), output=torch.zeros(L, D), normalized=True)
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=zero))
    run(pm)
    for layer in (2, 3):
        for mod in ("up_proj", "down_proj"):
            key = f"base_model.model.model.layers.{layer}.mlp.{mod}"
            expected = ref.get_submodule(f"model.layers.{layer}.mlp.{mod}").weight
            assert torch.allclose(effective(pm, key), expected, atol=1e-6), key


@pytest.mark.parametrize("mode", ["update", "gradient"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_importance_one_never_moves(mode, optimizer):
    pm = get_peft_model(
        tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=imp_with({0: 1.0, 5: 1.0}), softmask_mode=mode)
    )
    before = effective(pm, UP)
    run(pm, optimizer=optimizer, lr=1e-2, weight_decay=0.0)
    after = effective(pm, UP)
    assert torch.equal(after[[0, 5]], before[[0, 5]])
    assert not torch.allclose(after[1], before[1])


def test_importance_one_never_moves_under_weight_decay():
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=imp_with({3: 1.0})))
    before = effective(pm, UP)
    run(pm, weight_decay=0.1)
    assert torch.equal(effective(pm, UP)[3], before[3])


def movement_ratios(mode: str, optimizer: str, scales=(0.5, 0.1, 0.01)) -> list[float]:
    """Movement of row u with scale s over the movement of the same row unmasked (same data, same seed)."""
    unit = 7
    free = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=imp_with({}), softmask_mode=mode))
    start = effective(free, UP)
    run(free, optimizer=optimizer, lr=1e-3 if optimizer == "adamw" else 1e-1)
    free_move = (effective(free, UP)[unit] - start[unit]).norm()
    ratios = []
    for s in scales:
        pm = get_peft_model(
            tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=imp_with({unit: 1 - s}), softmask_mode=mode)
        )
        run(pm, optimizer=optimizer, lr=1e-3 if optimizer == "adamw" else 1e-1)
        ratios.append(float((effective(pm, UP)[unit] - start[unit]).norm() / free_move))
    return ratios


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_update_mode_moves_a_unit_s_times_as_far(optimizer):
    for s, ratio in zip((0.5, 0.1, 0.01), movement_ratios("update", optimizer)):
        assert ratio == pytest.approx(s, rel=0.10), (s, ratio)


def test_update_mode_gives_the_optimizer_the_true_gradient():
    # the delta's gradient is W's gradient (rows of trained roles), whatever the mask: clipping sees true norms
    masked = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=imp_with({0: 0.9, 1: 0.5})))
    plain = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4)))
    x = batch()
    for pm in (masked, plain):
        pm.train()
        pm(input_ids=x, labels=x).loss.backward()
    grad = lambda pm: pm.get_submodule(UP).cofitune_delta["default"].weight.grad  # noqa: E731
    assert torch.equal(grad(masked), grad(plain))


def test_gradient_mode_is_near_noop_under_adamw_but_works_under_sgd():
    # the trap (METHOD.md): Adam divides a constant per-row gradient factor out again
    for ratio in movement_ratios("gradient", "adamw"):
        assert ratio == pytest.approx(1.0, rel=0.10)
    for s, ratio in zip((0.5, 0.1, 0.01), movement_ratios("gradient", "sgd")):
        assert ratio == pytest.approx(s, rel=0.10), (s, ratio)


def test_none_mode_ignores_importance():
    a = get_peft_model(
        tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=imp_with({0: 1.0}), softmask_mode="none")
    )
    b = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4)))
    run(a)
    run(b)
    assert torch.allclose(effective(a, UP), effective(b, UP), atol=1e-7)


def test_gradient_accumulation_matches_large_batch():
    imp = imp_with({1: 0.5, 2: 0.9})
    big = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=imp))
    small = copy.deepcopy(big)
    x = torch.cat([batch(s, size=1) for s in range(8)])
    opt = torch.optim.AdamW([p for p in big.parameters() if p.requires_grad], lr=1e-3)
    big.train()
    big(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt2 = torch.optim.AdamW([p for p in small.parameters() if p.requires_grad], lr=1e-3)
    small.train()
    for i in range(8):
        (small(input_ids=x[i : i + 1], labels=x[i : i + 1]).loss / 8).backward()
    opt2.step()
    assert torch.allclose(effective(big, UP), effective(small, UP), atol=1e-6)


# ---------------------------------------------------------------------------------------------- unit -> row mapping


def full_importance():
    g = torch.Generator().manual_seed(0)
    return Importance(
        heads=torch.rand(L, H, generator=g),
        intermediate=torch.rand(L, INTER, generator=g),
        output=torch.rand(L, D, generator=g),
        normalized=True,
    )


def test_normalisation_is_per_layer_abs_tanh_z():
    raw = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    expected_row0 = torch.tanh(torch.tensor([-1.0, 0.0, 1.0])).abs()
    out = normalize(raw)
    assert torch.allclose(out[0], expected_row0)
    assert torch.equal(out[1], torch.zeros(3))  # a constant layer has no ranking


def test_kv_heads_take_the_max_of_their_query_group():
    assert torch.equal(kv_head_importance(torch.tensor([0.1, 0.7, 0.3, 0.2]), 2), torch.tensor([0.7, 0.3]))


def test_llama_gqa_mapping():
    imp = full_importance()
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(3, 4), target_modules="all", importance=imp))
    attn = pm.base_model.model.model.layers[3].self_attn
    mlp = pm.base_model.model.model.layers[3].mlp
    heads = imp.heads[3]
    assert torch.allclose(attn.q_proj.cofitune_scale["default"], (1 - heads).repeat_interleave(HD))
    kv = kv_head_importance(heads, KV)
    assert torch.allclose(attn.k_proj.cofitune_scale["default"], (1 - kv).repeat_interleave(HD))
    assert torch.allclose(attn.v_proj.cofitune_scale["default"], (1 - kv).repeat_interleave(HD))
    # o_proj: columns grouped by head
    assert attn.o_proj.cofitune_axis["default"] == 1
    assert torch.allclose(attn.o_proj.cofitune_scale["default"], (1 - heads).repeat_interleave(HD))
    assert torch.allclose(mlp.up_proj.cofitune_scale["default"], 1 - imp.intermediate[3])
    assert torch.allclose(mlp.gate_proj.cofitune_scale["default"], 1 - imp.intermediate[3])
    assert torch.allclose(mlp.down_proj.cofitune_scale["default"], 1 - imp.output[3])


def test_o_proj_column_mask_protects_a_head():
    heads = torch.zeros(L, H)
    heads[3, 1] = 1.0
    imp = Importance(heads=heads, normalized=True)
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(3, 4), target_modules=["o"], importance=imp))
    key = "base_model.model.model.layers.3.self_attn.o_proj"
    before = effective(pm, key)
    run(pm, steps=5, lr=1e-2)
    after = effective(pm, key)
    assert torch.equal(after[:, HD : 2 * HD], before[:, HD : 2 * HD])
    assert not torch.allclose(after[:, :HD], before[:, :HD])


def test_phi3_fused_gate_up_trains_only_up_rows_for_ffn():
    imp = full_importance()
    pm = get_peft_model(tiny_model("phi3"), CoFiTuneConfig(layers=(3, 4), target_modules="ffn", importance=imp))
    gate_up = pm.base_model.model.model.layers[3].mlp.gate_up_proj
    rows = gate_up.cofitune_rows["default"]
    assert torch.equal(rows, torch.cat([torch.zeros(INTER), torch.ones(INTER)]))
    assert torch.allclose(gate_up.cofitune_scale["default"], torch.cat([1 - imp.intermediate[3]] * 2))
    key = "base_model.model.model.layers.3.mlp.gate_up_proj"
    before = effective(pm, key)
    run(pm, steps=3, lr=1e-2)
    after = effective(pm, key)
    assert torch.equal(after[:INTER], before[:INTER])  # the gate half is frozen
    assert not torch.allclose(after[INTER:], before[INTER:])


def test_gpt2_conv1d_masks_output_columns():
    inter = 4 * D  # GPT-2's n_inner defaults to 4 * n_embd
    imp2 = Importance(
        intermediate=torch.rand(L, inter), output=torch.rand(L, D), heads=torch.rand(L, H), normalized=True
    )
    pm = get_peft_model(tiny_model("gpt2"), CoFiTuneConfig(layers=(3, 4), target_modules="all", importance=imp2))
    block = pm.base_model.model.transformer.h[3]
    assert block.mlp.c_fc.cofitune_axis["default"] == 1  # Conv1D weight is [in, out]
    assert torch.allclose(block.mlp.c_fc.cofitune_scale["default"], 1 - imp2.intermediate[3])
    # fused c_attn: q, k, v blocks each grouped by head
    assert torch.allclose(
        block.attn.c_attn.cofitune_scale["default"], (1 - imp2.heads[3]).repeat_interleave(HD).repeat(3)
    )
    assert block.attn.c_proj.cofitune_axis["default"] == 0  # o: input features are dim 0 of a Conv1D weight


def test_gpt_neox_interleaved_qkv():
    imp = full_importance()
    pm = get_peft_model(tiny_model("gpt_neox"), CoFiTuneConfig(layers=(3, 4), target_modules="mha", importance=imp))
    qkv = pm.base_model.model.gpt_neox.layers[3].attention.query_key_value
    assert torch.allclose(qkv.cofitune_scale["default"], (1 - imp.heads[3]).repeat_interleave(3 * HD))


def test_gpt_neox_queries_train_alone_in_its_per_head_fused_projection():
    # query_key_value rows are [q, k, v] per head: each row has one role, so queries can train without keys/values
    pm = get_peft_model(tiny_model("gpt_neox"), CoFiTuneConfig(layers=(2, 3), parts=["q"]))
    layer = pm.base_model.model.gpt_neox.layers[2].attention.query_key_value
    rows = layer.cofitune_rows["default"].view(4, 3, 8)  # [heads, (q, k, v), head_dim]
    assert torch.equal(rows[:, 0], torch.ones(4, 8)) and not rows[:, 1:].any()


def test_rows_that_serve_two_roles_are_refused_unless_both_are_selected():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from cofitune_peft import CoFiTuneError

    config = DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8, head_dim=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1,
    )  # fmt: skip
    with pytest.raises(CoFiTuneError, match="serve"):  # the latent key/value rows feed both keys and values
        get_peft_model(DeepseekV3ForCausalLM(config), CoFiTuneConfig(layers=(0, 2), parts=["k"]))
    pm = get_peft_model(DeepseekV3ForCausalLM(config), CoFiTuneConfig(layers=(0, 2), parts="mha"))
    assert pm.base_model.model.model.layers[1].self_attn.kv_a_proj_with_mqa.cofitune_rows["default"].all()


@pytest.mark.parametrize("arch", sorted({"llama", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "opt"}))
def test_every_layout_adds_up(arch):
    model = tiny_model(arch)
    layout = model_layout(model)
    importance = full_importance() if layout.layers[0].sizes["intermediate"] == INTER else None
    for module_layout in layout.layers[0].modules:
        module = base_of(model.get_submodule(layout.key(0, module_layout.name)))
        size = module.weight.shape[weight_axis(module, module_layout.axis)]
        scale, uncovered = module_scale(importance, 0, module_layout)
        assert module_layout.size == size and scale.shape == (size,) and not uncovered
