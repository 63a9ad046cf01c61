"""Deltas in low precision (`CoFiTuneConfig.delta_dtype`), their exact save/load, and `CoFiTuneAdamW`: stochastic
rounding, 8-bit and factored states, the step fused into the backward pass and what it refuses."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import batch, tiny_model, tiny_tokenizer

from cofitune_peft import CoFiTuneAdamW, CoFiTuneConfig, CoFiTuneError
from cofitune_peft.layer import CoFiTuneLayer
from cofitune_peft.optim import stochastic_round_

HERE = os.path.dirname(os.path.abspath(__file__))


def bnb_or_skip():
    return pytest.importorskip("bitsandbytes")


def deltas(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "cofitune_delta" in n}


def train_steps(model, optimizer, steps=3, scheduler=None, seed=0):
    model.train()
    for step in range(steps):
        x = batch(seed + step)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
    model.eval()


# ---------------------------------------------------------------------------------------------- delta_dtype


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
@pytest.mark.parametrize(
    ("base", "requested", "expected"),
    [
        (torch.bfloat16, None, None),  # PEFT's choice: fp32 under autocast, the base's dtype without
        (torch.bfloat16, "bfloat16", torch.bfloat16),
        (torch.bfloat16, "float16", torch.float16),
        (torch.bfloat16, "float32", torch.float32),
        (torch.float32, "bfloat16", torch.bfloat16),
    ],
)
def test_delta_dtype_is_independent_of_peft_autocast(base, requested, expected, autocast):
    pm = get_peft_model(
        tiny_model().to(base), CoFiTuneConfig(layers=(2, 5), delta_dtype=requested), autocast_adapter_dtype=autocast
    )
    if expected is None:
        expected = torch.float32 if autocast else base
    layers = [m for m in pm.modules() if isinstance(m, CoFiTuneLayer)]
    assert len(layers) == 6
    for layer in layers:
        assert layer.cofitune_delta["default"].weight.dtype == expected
        assert layer.cofitune_delta["default"].weight.requires_grad
        # the soft-mask buffers follow PEFT's flag as before
        assert layer.cofitune_scale["default"].dtype == (torch.float32 if autocast else base)
    x = batch()
    with torch.no_grad():
        with pm.disable_adapter():
            base_logits = pm(input_ids=x).logits
        assert torch.equal(pm(input_ids=x).logits, base_logits)  # zero deltas: the base model


@pytest.mark.parametrize("bad", ["bf16", "int8", torch.bfloat16, 16])
def test_bad_delta_dtype_is_refused(bad):
    with pytest.raises(CoFiTuneError, match="`delta_dtype`"):
        CoFiTuneConfig(delta_dtype=bad)


def test_bf16_deltas_train_and_round_trip_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_model().to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16),
        CoFiTuneConfig(layers=(2, 6), delta_dtype="bfloat16"),
    )
    params = [p for p in pm.parameters() if p.requires_grad]
    train_steps(pm, CoFiTuneAdamW(params, lr=1e-2))
    trained = {n: p.detach().clone() for n, p in deltas(pm).items()}
    assert all(p.dtype == torch.bfloat16 and p.abs().sum() > 0 for p in trained.values())
    x = batch(7)
    with torch.no_grad():
        ref = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {v.dtype for k, v in tensors.items() if "cofitune_delta" in k} == {torch.bfloat16}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["delta_dtype"] == "bfloat16"

    out = str(tmp_path / "loaded.pt")
    script = f"""
        import torch, cofitune_peft
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from tiny_models import batch
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}, dtype=torch.bfloat16)
        pm = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})  # PEFT's autocast_adapter_dtype=True
        with torch.no_grad():
            logits = pm(input_ids=batch(7)).logits
        deltas = {{n: p.detach() for n, p in pm.named_parameters() if "cofitune_delta" in n}}
        torch.save({{"logits": logits, "deltas": deltas}}, {out!r})
    """
    code = f"import sys; sys.path.insert(0, {HERE!r})\n" + textwrap.dedent(script)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    loaded = torch.load(out)
    assert torch.equal(loaded["logits"], ref)
    assert set(loaded["deltas"]) == set(trained)
    for name, value in trained.items():
        assert loaded["deltas"][name].dtype == torch.bfloat16 and torch.equal(loaded["deltas"][name], value)


def test_save_dtype_overrides_the_delta_dtype_and_loads_back(tmp_path):
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(delta_dtype="bfloat16", save_dtype="float32", init_weights=False))
    pm.save_pretrained(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {v.dtype for k, v in tensors.items() if "cofitune_delta" in k} == {torch.float32}
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "a")
    for (name, a), (_, b) in zip(deltas(pm).items(), deltas(loaded).items()):
        assert b.dtype == torch.bfloat16 and torch.equal(a, b), name  # bf16 -> fp32 -> bf16 is exact


# ---------------------------------------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype):
    value = torch.linspace(-3.0, 3.0, 41).repeat_interleave(4000) * (1 + 2**-11)  # [41 * 4000], between grid points
    out = torch.empty_like(value, dtype=dtype)
    stochastic_round_(out, value, torch.Generator().manual_seed(0))
    near = value.to(dtype)
    other = torch.nextafter(near, torch.where(value > near.float(), torch.inf, -torch.inf).to(dtype))
    assert bool(((out == near) | (out == other)).all())
    groups = out.float().view(41, 4000).mean(1)
    spacing = (other.float() - near.float()).abs().view(41, 4000)[:, 0]
    error = (groups - value.view(41, 4000)[:, 0]).abs()
    # the mean of 4000 draws lies within 5 standard errors (0.5 spacing / sqrt(4000) at most) of the value
    assert bool((error <= 5 * 0.5 * spacing / 4000**0.5 + 1e-12).all()), error.max()
    exact = torch.tensor([1.0, -2.0, 0.0, float("inf")])
    out = torch.empty_like(exact, dtype=dtype)
    stochastic_round_(out, exact, torch.Generator().manual_seed(1))
    assert torch.equal(out.float(), exact)


def test_stochastic_rounding_keeps_steps_that_nearest_rounding_drops():
    moved = {}
    for rounding in ("nearest", "stochastic"):
        w = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))  # bf16 spacing at 1: 2**-7 = 0.0078
        opt = CoFiTuneAdamW([w], lr=1e-4, betas=(0.0, 0.999), eps=0.0, weight_decay=0.0, rounding=rounding)
        for _ in range(100):
            w.grad = -torch.ones_like(w)  # each step adds exactly lr = 1e-4, an 80th of the spacing
            opt.step()
        moved[rounding] = float(w.float().mean()) - 1.0
    assert moved["nearest"] == 0.0
    assert moved["stochastic"] == pytest.approx(100 * 1e-4, rel=0.05)


# ---------------------------------------------------------------------------------------------- the update itself


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_fp32_nearest_is_torch_adamw_bit_for_bit(decay):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(300, 70))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=decay, foreach=False)
    ours = CoFiTuneAdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=decay, rounding="nearest", chunk_size=1024)
    for _ in range(4):
        g = torch.randn(300, 70)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_state_is_bitsandbytes_adamw8bit_bit_for_bit(dtype):
    bnb = bnb_or_skip()
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 200).to(dtype))  # >= 4096 values: 8-bit states in both
    b = torch.nn.Parameter(a.detach().clone())
    ref = bnb.optim.AdamW8bit([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ours = CoFiTuneAdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, rounding="nearest", state_dtype="int8",
                         chunk_size=512)  # fmt: skip
    for _ in range(4):
        g = torch.randn(64, 200).to(dtype)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert torch.equal(a, b)
    state = ours.state[b]
    assert state["exp_avg"]["codes"].dtype == torch.uint8 and state["exp_avg"]["absmax"].numel() == 50


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.999)], ids=["momentum", "no-momentum"])
def test_factored_second_moment_is_small_and_learns(betas):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(48, 32))
    target = torch.randn(48, 32)
    opt = CoFiTuneAdamW([w], lr=1e-2, betas=betas, rounding="nearest", second_moment="factored")
    for _ in range(200):
        w.grad = w.detach() - target
        grad = w.grad.clone()
        opt.step()
        assert torch.equal(w.grad, grad)  # the step never writes into the gradient
    state = opt.state[w]
    assert (
        "exp_avg_sq" not in state and state["exp_avg_sq_row"].shape == (48,) and state["exp_avg_sq_col"].shape == (32,)
    )
    assert float((w - target).norm()) < 0.15 * float(target.norm())  # a quadratic: it converges


def test_factored_step_is_clipped_to_rms_one():
    # one huge entry: the rank-1 estimate r c / mean(r) puts the other rows' and columns' second moment ~1e-11, far
    # below their 1e-6, so their normalised gradient is ~150 (Adam's would be 1); the clipping brings the RMS to 1
    g = torch.full((64, 64), 1e-3)
    g[0, 0] = 10.0
    w = torch.nn.Parameter(torch.zeros(64, 64))
    opt = CoFiTuneAdamW([w], lr=1e-2, betas=(0.0, 0.999), eps=0.0, weight_decay=0.0, rounding="nearest",
                        second_moment="factored")  # fmt: skip
    w.grad = g
    opt.step()
    rms = float((w.detach() / 1e-2).square().mean().sqrt())
    assert rms == pytest.approx(1.0, rel=1e-4)


def test_no_first_moment_keeps_no_state_for_it():
    w = torch.nn.Parameter(torch.zeros(8, 8))
    opt = CoFiTuneAdamW([w], betas=(0.0, 0.99))
    w.grad = torch.ones(8, 8)
    opt.step()
    assert "exp_avg" not in opt.state[w] and "exp_avg_sq" in opt.state[w]


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "int8"])
def test_state_dict_round_trip_keeps_state_dtypes(state_dtype):
    if state_dtype == "int8":
        bnb_or_skip()
    w = torch.nn.Parameter(torch.randn(64, 128).to(torch.bfloat16))
    opt = CoFiTuneAdamW([w], lr=1e-3, state_dtype=state_dtype)
    for _ in range(2):
        w.grad = torch.randn_like(w)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    clone = torch.nn.Parameter(w.detach().clone())
    again = CoFiTuneAdamW([clone], lr=1e-3, state_dtype=state_dtype)
    again.load_state_dict(saved)

    def flat(state):
        out = {}
        for k, v in state.items():
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
        return out

    before, after = flat(opt.state[w]), flat(again.state[clone])
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == after[key].dtype and torch.equal(value, after[key]), key
    g = torch.randn_like(w)
    w.grad, clone.grad = g.clone(), g.clone()
    opt.step()
    again.step()
    assert torch.equal(w, clone)


def test_bad_optimizer_arguments_are_all_reported():
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(CoFiTuneError) as err:
        CoFiTuneAdamW([w], rounding="up", state_dtype="int4", second_moment="low-rank", betas=(1.0, 0.9))
    for name in ("`rounding`", "`state_dtype`", "`second_moment`", "`betas`"):
        assert name in str(err.value)


# ---------------------------------------------------------------------------------------------- the fused step


def cofitune_bf16(seed=0):
    base = tiny_model(seed=seed, intermediate_size=128).to(torch.bfloat16)  # 32 x 128 deltas: 8-bit states
    return get_peft_model(base, CoFiTuneConfig(layers=(2, 6), delta_dtype="bfloat16"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rounding": "nearest"},
        {"rounding": "stochastic"},
        {"rounding": "stochastic", "state_dtype": "bfloat16"},
        {"rounding": "stochastic", "state_dtype": "int8", "second_moment": "factored"},
    ],
    ids=["nearest", "stochastic", "bf16-state", "int8-factored"],
)
def test_fused_step_equals_unfused_step(kwargs):
    if kwargs.get("state_dtype") == "int8":
        bnb_or_skip()
    results = []
    for fused in (False, True):
        pm = cofitune_bf16()
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = CoFiTuneAdamW(params, lr=1e-2, weight_decay=0.1, fused_backward=fused, **kwargs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        train_steps(pm, opt, steps=4, scheduler=scheduler)
        results.append({n: p.detach().clone() for n, p in deltas(pm).items()})
    unfused, fused = results
    assert unfused.keys() == fused.keys() and len(unfused) == 8
    for name in unfused:
        assert unfused[name].abs().sum() > 0
        assert torch.equal(unfused[name], fused[name]), name


def test_fused_step_frees_each_gradient_inside_the_backward_pass():
    pm = cofitune_bf16()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = CoFiTuneAdamW(params, lr=1e-2, fused_backward=True)
    live = []
    # when the lowest window layer's input gradient is computed, the deltas above it have stepped and freed theirs
    layer2 = pm.base_model.model.model.layers[2]
    layer2.register_full_backward_hook(lambda *a: live.append([p.grad is not None for p in params]))
    x = batch()
    pm.train()
    before = [p.detach().clone() for p in params]
    pm(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is None for p in params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    assert live and not any(live[0])
    opt.step()  # a no-op check
    opt.zero_grad()


def test_fused_step_refuses_gradient_accumulation_at_runtime():
    pm = cofitune_bf16()
    _ = CoFiTuneAdamW([p for p in pm.parameters() if p.requires_grad], fused_backward=True)  # its hooks keep it
    x = batch()
    pm.train()
    pm(input_ids=x, labels=x).loss.backward()
    with pytest.raises(CoFiTuneError, match="gradient accumulation"):
        pm(input_ids=x, labels=x).loss.backward()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4"),
        ({"max_grad_norm": 1.0}, r"max_grad_norm=1\.0"),
        ({"fp16": True}, "fp16"),
        ({"fsdp": "full_shard"}, "FSDP"),
        ({"deepspeed": "ds.json"}, "DeepSpeed"),
    ],
)
def test_fused_step_refuses_what_it_cannot_honour(args, match):
    training_args = SimpleNamespace(**{"gradient_accumulation_steps": 1, "max_grad_norm": 0.0, **args})
    w = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(CoFiTuneError, match=match):
        CoFiTuneAdamW([w], fused_backward=True, training_args=training_args)
    CoFiTuneAdamW([w], fused_backward=False, training_args=training_args)  # unfused: nothing to refuse


def test_fused_step_refuses_data_parallel(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(CoFiTuneError, match="DDP reduces the gradients"):
        CoFiTuneAdamW([torch.nn.Parameter(torch.zeros(4))], fused_backward=True)


def test_fused_step_refuses_a_parameter_whose_hook_did_not_run():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = CoFiTuneAdamW([w], fused_backward=True)
    w.grad = torch.ones(4)  # set by hand: no backward, no hook
    with pytest.raises(CoFiTuneError, match="hook did not run"):
        opt.step()


# ---------------------------------------------------------------------------------------------- the kit's loop, Trainer


def arithmetic(n=16):
    return [{"prompt": f"{a}+{a % 5}=", "completion": str(a + a % 5)} for a in range(n)]


@pytest.mark.parametrize(
    "optimizer",
    ["adamw8bit", functools.partial(CoFiTuneAdamW, state_dtype="int8", second_moment="factored", fused_backward=True)],
    ids=["bnb-adamw8bit", "cofitune-int8-fused"],
)
def test_train_sft_trains_cofitune_with_8bit_states(optimizer):
    bnb_or_skip()
    from cofitune_peft.kit.training import train_sft

    pm = cofitune_bf16()
    before = {n: p.detach().clone() for n, p in deltas(pm).items()}
    stats = train_sft(pm, arithmetic(), tokenizer=tiny_tokenizer(), steps=6, learning_rate=1e-2, batch_size=4,
                      max_length=32, progress=False, optimizer=optimizer)  # fmt: skip
    assert stats["losses"][-1] < stats["losses"][0]
    after = deltas(pm)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert all(p.dtype == torch.bfloat16 for p in after.values())


def test_train_sft_refuses_a_fused_optimizer_with_accumulation():
    from cofitune_peft.kit.training import train_sft

    pm = cofitune_bf16()
    with pytest.raises(CoFiTuneError, match="gradient_accumulation_steps=2"):
        train_sft(pm, arithmetic(), tokenizer=tiny_tokenizer(), steps=2, learning_rate=1e-2, batch_size=4,
                  gradient_accumulation_steps=2, progress=False,
                  optimizer=functools.partial(CoFiTuneAdamW, fused_backward=True))  # fmt: skip
    with pytest.raises(CoFiTuneError, match="`optimizer`"):
        train_sft(pm, arithmetic(), tokenizer=tiny_tokenizer(), steps=2, learning_rate=1e-2, optimizer="sgd")


def sft_args(tmp_path, **overrides):
    from trl import SFTConfig

    kwargs = {"output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 4,
              "learning_rate": 1e-2, "save_strategy": "no", "report_to": [], "use_cpu": True, "bf16": False,
              "max_length": 32, "seed": 0, "disable_tqdm": True}  # fmt: skip
    return SFTConfig(**{**kwargs, **overrides})


def sft_trainer(args, **kwargs):
    from datasets import Dataset
    from trl import SFTTrainer

    model = tiny_model(intermediate_size=128).to(torch.bfloat16)  # 32 x 128 deltas: bitsandbytes keeps 8-bit states
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(arithmetic(32)),
                      processing_class=tiny_tokenizer(), peft_config=CoFiTuneConfig(layers=(2, 6), delta_dtype="bfloat16"),
                      **kwargs)  # fmt: skip


def test_trainer_with_bitsandbytes_8bit_adamw(tmp_path):
    bnb_or_skip()
    trainer = sft_trainer(sft_args(tmp_path, optim="adamw_bnb_8bit"))
    before = {n: p.detach().clone() for n, p in deltas(trainer.model).items()}
    trainer.train()
    after = deltas(trainer.model)
    states = [trainer.optimizer.optimizer.state[p] for p in after.values()]
    assert all(state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8 for state in states)
    assert all(p.dtype == torch.bfloat16 and not torch.equal(before[n], p) for n, p in after.items())


def test_trainer_with_fused_cofitune_adamw(tmp_path):
    args = sft_args(tmp_path, max_grad_norm=0.0)
    fused = {"fused_backward": True, "rounding": "stochastic", "training_args": args}
    trainer = sft_trainer(args, optimizer_cls_and_kwargs=(CoFiTuneAdamW, fused))
    before = {n: p.detach().clone() for n, p in deltas(trainer.model).items()}
    trainer.train()
    after = deltas(trainer.model)
    assert all(not torch.equal(before[n], p) for n, p in after.items())
    assert all(p.grad is None for p in after.values())
    # the Trainer's default clipping (max_grad_norm=1.0) is refused by name when it builds the optimizer
    args = sft_args(tmp_path)
    trainer = sft_trainer(args, optimizer_cls_and_kwargs=(CoFiTuneAdamW, {**fused, "training_args": args}))
    with pytest.raises(CoFiTuneError, match=r"max_grad_norm=1\.0"):
        trainer.train()


# ---------------------------------------------------------------------------------------------- on a GPU (check.sh)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_fused_step_equals_unfused_step_on_cuda(state_dtype):
    if state_dtype == "int8":
        bnb_or_skip()
    results = []
    for fused in (False, True):
        pm = cofitune_bf16().cuda()
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = CoFiTuneAdamW(params, lr=1e-2, state_dtype=state_dtype, second_moment="factored", fused_backward=fused)
        pm.train()
        for step in range(3):
            x = batch(step).cuda()
            pm(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results.append({n: p.detach().clone() for n, p in deltas(pm).items()})
    assert all(torch.equal(results[0][n], results[1][n]) and results[0][n].abs().sum() > 0 for n in results[0])


@pytest.mark.gpu
@cuda
def test_stochastic_rounding_on_cuda_is_unbiased():
    value = torch.full((1 << 20,), 1.0 + 2**-10, device="cuda")  # an eighth of bf16's spacing above 1
    out = torch.empty_like(value, dtype=torch.bfloat16)
    stochastic_round_(out, value, torch.Generator(device="cuda").manual_seed(0))
    assert set(out.float().unique().tolist()) == {1.0, 1.0078125}
    assert float(out.float().mean()) == pytest.approx(1.0 + 2**-10, abs=5 * 2**-8 / 2**10)


def test_weighted_adapter_and_lora_export_keep_bf16_deltas():
    from cofitune_peft.model import convert_to_lora

    pm = get_peft_model(tiny_model().to(torch.bfloat16), CoFiTuneConfig(layers=(2, 4), delta_dtype="bfloat16",
                                                                        init_weights=False))  # fmt: skip
    pm.add_adapter("other", CoFiTuneConfig(layers=(2, 4), delta_dtype="bfloat16", init_weights=False))
    pm.base_model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "both")
    assert pm.peft_config["both"].delta_dtype == "bfloat16"
    layer = pm.base_model.model.model.layers[2].mlp.up_proj
    both = layer.cofitune_delta["both"].weight
    assert both.dtype == torch.bfloat16
    expected = layer.get_delta_weight("default").float() + layer.get_delta_weight("other").float()
    torch.testing.assert_close(both.float(), expected, atol=2e-2, rtol=1e-2)  # the sum, rounded to bf16 once
    lora_config, state = convert_to_lora(pm, rank=32, adapter_name="default")  # full rank: exact up to bf16 rounding
    assert {v.dtype for v in state.values()} == {torch.bfloat16} and lora_config.r == 32


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_trainer_resume_with_cofitune_adamw_matches_uninterrupted(tmp_path, fused):
    """Bit for bit: the bf16 deltas and the optimizer's int8/factored state come back from the checkpoint (the
    stochastic rounding's draws depend on the step count, which the state carries)."""
    bnb_or_skip()
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= 2:
                control.should_training_stop = True

    options = {"state_dtype": "int8", "second_moment": "factored", "fused_backward": fused}

    def make(out, **overrides):
        args = sft_args(tmp_path, output_dir=str(tmp_path / out), max_steps=4, max_grad_norm=0.0, **overrides)
        return sft_trainer(args, optimizer_cls_and_kwargs=(CoFiTuneAdamW, {**options, "training_args": args}))

    full = make("full")
    full.train()
    reference = {n: p.detach().clone() for n, p in deltas(full.model).items()}
    first = make("resumed", save_strategy="steps", save_steps=2)
    first.add_callback(StopAt())
    first.train()
    second = make("resumed")
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    resumed = deltas(second.model)
    assert reference.keys() == resumed.keys()
    for name, value in reference.items():
        assert resumed[name].dtype == torch.bfloat16 and torch.equal(resumed[name], value), name
