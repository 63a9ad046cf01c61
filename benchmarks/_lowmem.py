"""The configurations of the low-precision table: CoFiTune's deltas in fp32 or bf16, the compensated update
(`CoFiTuneAdamW`'s stochastic rounding), 8-bit and factored optimizer states, the step fused into the backward pass, and
the freeze-tuning peer (the same window's weights trained in place in the model's dtype, as LLaMA-Factory's freeze
tuning and Axolotl's `unfrozen_parameters` do). Each says how `bench_step.py` (plain loop) and `bench_trainer.py` (TRL
`SFTTrainer`) build it, and what the memory model is told about it (`estimate_kwargs`). LoRA r16 and full fine-tuning
are the scripts' own `lora_r16` and `full_ft` configurations, run with `--dtype bfloat16`. Imported as `_lowmem`."""

from __future__ import annotations

# name -> (label, method, delta dtype, optimizer kind, optimizer keyword arguments)
# optimizer kinds: "torch" (torch.optim.AdamW; the Trainer's default adamw_torch_fused), "bnb8" (bitsandbytes
# AdamW8bit; the Trainer's optim="adamw_bnb_8bit"), "cofitune" (CoFiTuneAdamW with these arguments).
LOWMEM = {
    "cofitune_fp32": ("CoFiTune, fp32 deltas (PEFT's default), AdamW", "cofitune", None, "torch", {}),
    "cofitune_bf16": ("CoFiTune, bf16 deltas, AdamW (nearest rounding)", "cofitune", "bfloat16", "torch", {}),
    "cofitune_bf16_sr": (
        "CoFiTune, bf16 deltas, stochastic rounding (CoFiTuneAdamW, bf16 states)", "cofitune", "bfloat16",
        "cofitune", {"state_dtype": "bfloat16"},
    ),
    "cofitune_bf16_8bit": ("CoFiTune, bf16 deltas, 8-bit AdamW (bitsandbytes)", "cofitune", "bfloat16", "bnb8", {}),
    "cofitune_bf16_fused": (
        "CoFiTune, bf16 deltas, stochastic rounding, fused step (bf16 states)", "cofitune", "bfloat16", "cofitune",
        {"state_dtype": "bfloat16", "fused_backward": True},
    ),
    "cofitune_lowmem": (
        "CoFiTune, bf16 deltas, stochastic rounding, int8 momentum + factored 2nd moment (recommended)", "cofitune",
        "bfloat16", "cofitune", {"state_dtype": "int8", "second_moment": "factored"},
    ),
    "cofitune_lowmem_fused": (
        "CoFiTune, recommended + fused step", "cofitune", "bfloat16", "cofitune",
        {"state_dtype": "int8", "second_moment": "factored", "fused_backward": True},
    ),
    "cofitune_nomom": (
        "CoFiTune, bf16 deltas, stochastic rounding, no momentum + factored 2nd moment (Adafactor-like)", "cofitune",
        "bfloat16", "cofitune", {"betas": (0.0, 0.95), "second_moment": "factored"},
    ),
    "freeze_bf16": ("freeze tuning (same window, bf16 in place), AdamW", "freeze", None, "torch", {}),
}  # fmt: skip
BETAS, WEIGHT_DECAY = (0.9, 0.95), 0.1


def label(name: str) -> str:
    return LOWMEM[name][0]


def fused(name: str) -> bool:
    return bool(LOWMEM[name][4].get("fused_backward"))


def freeze_window(model) -> None:
    """Freeze tuning: every weight frozen except those of CoFiTune's default window and modules (the real plan, read
    with `get_peft_model` on a meta copy of the model), which train in place."""
    from cofitune_peft.kit.memory import _decoder_layers, cofitune_plan

    wrapped = cofitune_plan(model.config).wrapped
    model.requires_grad_(False)
    layers = _decoder_layers(model)
    for index, names in wrapped.items():
        for name in names:
            layers[index].get_submodule(name).weight.requires_grad_(True)


def build_model(name: str, model, importance):
    """The model to train for a `LOWMEM` configuration (a CoFiTune PeftModel with the soft mask in update mode, or the
    base model with its window unfrozen)."""
    if LOWMEM[name][1] == "freeze":
        freeze_window(model)
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config(name, importance))


def peft_config(name: str, importance):
    from cofitune_peft import CoFiTuneConfig

    _, method, delta_dtype, _, _ = LOWMEM[name]
    if method != "cofitune":
        return None
    return CoFiTuneConfig(importance=importance, softmask_mode="update", delta_dtype=delta_dtype)


def plain_optimizer(name: str, params, lr: float):
    """The plain loop's optimizer for a `LOWMEM` configuration."""
    import torch

    _, _, _, kind, kwargs = LOWMEM[name]
    if kind == "torch":
        return torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    if kind == "bnb8":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    from cofitune_peft import CoFiTuneAdamW

    return CoFiTuneAdamW(params, **{"lr": lr, "betas": BETAS, "weight_decay": WEIGHT_DECAY, **kwargs})


def trainer_optimizer(name: str) -> tuple[dict, dict]:
    """`(SFTConfig overrides, SFTTrainer keyword arguments)` of a `LOWMEM` configuration's optimizer; the
    `CoFiTuneAdamW` kwargs get `training_args` filled in by the caller (key `"training_args"` set to None here)."""
    _, _, _, kind, kwargs = LOWMEM[name]
    if kind == "torch":
        return {}, {}
    if kind == "bnb8":
        return {"optim": "adamw_bnb_8bit"}, {}
    from cofitune_peft import CoFiTuneAdamW

    overrides = {"max_grad_norm": 0.0} if kwargs.get("fused_backward") else {}
    return overrides, {"optimizer_cls_and_kwargs": (CoFiTuneAdamW, {**kwargs, "training_args": None})}


def estimate_kwargs(name: str, *, trainer: bool) -> dict:
    """`estimate_training_memory` keyword arguments for a configuration of the bf16 table (also `lora_r16` and
    `full_ft`): the method, the trainable dtype and the optimizer as the run builds them. Under the Trainer torch's
    AdamW is the fused kernel (`adamw_torch_fused`)."""
    torch_adamw = "adamw_fused" if trainer else "adamw"
    if name == "lora_r16":
        return {"method": "lora", "trainable_dtype": "float32", "optimizer": torch_adamw}
    if name == "full_ft":
        return {"method": "full", "optimizer": torch_adamw}
    _, method, delta_dtype, kind, kwargs = LOWMEM[name]
    out = {
        "method": method,
        "trainable_dtype": "float32" if method == "cofitune" and delta_dtype is None else "bfloat16",
    }
    if kind == "torch":
        out["optimizer"] = torch_adamw
    elif kind == "bnb8":
        out["optimizer"] = "adamw8bit"
    else:
        out.update(optimizer="cofitune_adamw", state_dtype=kwargs.get("state_dtype", "float32"),
                   second_moment=kwargs.get("second_moment", "full"), fused_step=bool(kwargs.get("fused_backward")),
                   momentum=kwargs.get("betas", BETAS)[0] > 0)  # fmt: skip
    if method == "cofitune":
        out["mask_mode"] = "update"
    return out
