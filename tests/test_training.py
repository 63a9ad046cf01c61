"""Training cost: the backward pass stops at the window, with and without gradient checkpointing; TRL drop-in."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import batch, tiny_model, tiny_tokenizer

from cofitune_peft import CoFiTuneConfig, CoFiTuneLayer


def layer_outputs_require_grad(pm, x) -> list[bool]:
    flags = []
    hooks = [
        layer.register_forward_hook(
            lambda m, a, out: flags.append((out[0] if isinstance(out, tuple) else out).requires_grad)
        )
        for layer in pm.base_model.model.model.layers
    ]
    try:
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return flags


def window_grads(pm):
    return [p.grad for n, p in pm.named_parameters() if p.requires_grad and "cofitune_delta" in n]


def test_nothing_below_the_window_enters_the_backward_pass():
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(3, 5)))
    pm.train()
    flags = layer_outputs_require_grad(pm, batch())
    assert flags == [False] * 3 + [True] * 5
    assert all(g is not None and g.abs().sum() > 0 for g in window_grads(pm))


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_input_grad_hook_is_replaced(reentrant):
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(3, 5)))
    base = pm.get_base_model()
    # what Trainer / TRL do for PEFT models with gradient checkpointing
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    pm.enable_input_require_grads()
    assert base._require_grads_hooks
    pm.train()
    flags = layer_outputs_require_grad(pm, batch())
    assert not getattr(base, "_require_grads_hooks", None)
    assert flags[:3] == [False] * 3
    assert all(flags[3:])
    grads = window_grads(pm)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_checkpointing_gives_the_same_gradients():
    x = batch()
    plain = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(3, 5), init_weights=False))
    ckpt = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(3, 5), init_weights=False))
    ckpt.load_state_dict(plain.state_dict())
    ckpt.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ckpt.enable_input_require_grads()
    for pm in (plain, ckpt):
        pm.train()
        pm(input_ids=x, labels=x).loss.backward()
    for a, b in zip(window_grads(plain), window_grads(ckpt)):
        assert torch.allclose(a, b, atol=1e-6)


def test_keeping_the_hook_when_asked():
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(3, 5), fix_input_grads=False))
    pm.enable_input_require_grads()
    pm.train()
    flags = layer_outputs_require_grad(pm, batch())
    assert all(flags)


def test_sft_trainer_drop_in(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"{a}+{a}"}],
                "completion": [{"role": "assistant", "content": str(2 * a)}],
            }
            for a in range(16)
        ]
    )
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        gradient_checkpointing=True,
        use_cpu=True,
        max_length=32,
    )
    trainer = SFTTrainer(
        model=tiny_model(),
        args=args,
        train_dataset=data,
        processing_class=tiny_tokenizer(),
        peft_config=CoFiTuneConfig(layers=(3, 5)),
    )
    pm = trainer.model
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainer.train()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("cofitune_delta" in n for n in changed)
    assert {int(n.split("layers.")[1].split(".")[0]) for n in changed} == {3, 4}
    assert not getattr(pm.get_base_model(), "_require_grads_hooks", None)
    assert any(isinstance(m, CoFiTuneLayer) for m in pm.modules())


@pytest.mark.parametrize("reentrant", [None, False, True], ids=["no-ckpt", "non-reentrant", "reentrant"])
@pytest.mark.parametrize("mode", ["update", "gradient"])
def test_bf16_base_with_checkpointing_keeps_truncation_and_mask(reentrant, mode):
    """A bf16 base, with or without checkpointing: the backward stops at the window and protected rows never move."""
    from cofitune_peft import Importance

    intermediate = torch.zeros(8, 48)
    intermediate[3, :10] = 1.0  # units 0..9 of layer 3: fully protected, so their up_proj rows must stay put
    importance = Importance(intermediate=intermediate, output=torch.zeros(8, 32), normalized=True)
    pm = get_peft_model(
        tiny_model().to(torch.bfloat16), CoFiTuneConfig(layers=(3, 5), importance=importance, softmask_mode=mode)
    )
    if reentrant is not None:
        pm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        pm.enable_input_require_grads()
    optimizer = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1.0)
    pm.train()
    for step in range(2):
        flags = layer_outputs_require_grad(pm, batch(seed=step))
        assert flags == [False] * 3 + [True] * 5
        optimizer.step()
        optimizer.zero_grad()
    up = pm.base_model.model.model.layers[3].mlp.up_proj
    # PEFT's `autocast_adapter_dtype` keeps trainable adapter weights in fp32 on a bf16 base, as for LoRA
    assert up.cofitune_delta["default"].weight.dtype == torch.float32
    assert up.get_base_layer().weight.dtype == torch.bfloat16
    with torch.no_grad():
        moved = up.get_delta_weight("default").float().abs().sum(dim=1)  # [intermediate]
    assert torch.all(moved[:10] == 0), moved[:10]
    assert torch.all(moved[10:] > 0)
