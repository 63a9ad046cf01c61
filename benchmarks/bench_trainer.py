"""Training step time and peak memory inside TRL's `SFTTrainer`: CoFiTune vs LoRA r16 (all linear) vs full fine-tuning.

SmolLM2-135M-Instruct (fp32, CPU), `SFTConfig(use_cpu=True, bf16=False, per_device_train_batch_size=4,
max_length=256)` and otherwise TRL's defaults: gradient checkpointing on (TRL's default; with transformers 5 it is
non-reentrant, and the table reports what each run actually used), fused AdamW, linear schedule. The data are real
prose rows of `cofitune_peft.kit.data.general_texts(split="eval")` that are all at least 256 tokens long, so TRL truncates
every row to 256 tokens and every batch is 4 x 256 (checked in each run).

Each configuration runs in its own child process (so that each one's peak RSS is its own). A `TrainerCallback` times
every optimizer step from `on_step_begin` to `on_step_end` (forward, backward, clipping, optimizer and scheduler; not
the data loading); the first `--warmup` steps are dropped and the median of the others is reported. After training,
one more forward pass counts the decoder layers whose output requires grad, i.e. the layers that enter the backward
pass (CoFiTune's window and the layers above it; all 30 for LoRA and full fine-tuning).

    python benchmarks/bench_trainer.py [--steps 8] [--warmup 2] [--threads 2] [--out benchmarks/results/trainer.json]

The low-precision table (`_lowmem.LOWMEM`) runs on the model in bf16 (pure bf16, `bf16=False`: no autocast), the
`CoFiTuneAdamW` configurations through `optimizer_cls_and_kwargs` (the fused ones with `max_grad_norm=0`), 8-bit AdamW
through `optim="adamw_bnb_8bit"`, the others with TRL's default fused AdamW:

    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/bench_trainer.py --dtype bfloat16 --threads 1 \
        --configs lora_r16 full_ft freeze_bf16 cofitune_fp32 cofitune_bf16 cofitune_bf16_sr cofitune_bf16_8bit \
        cofitune_bf16_fused cofitune_lowmem cofitune_lowmem_fused cofitune_nomom --out benchmarks/results/trainer_bf16.json

Each child records its RSS after the imports and its peak RSS from `on_train_begin` on (`peak_train_rss_mb`), which
`benchmarks/gpu/memory_table.py` compares with the memory model.

Estimate, not a measurement: the default run (5 configurations, 10 steps each) takes about 5-8 minutes on 2 idle CPU
cores. Run it alone: two torch processes on two cores slow each other down many times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from _common import (
    current_rss_mb,
    decoder_layers,
    layers_in_backward,
    long_texts,
    markdown,
    peak_rss_since_reset_mb,
    random_importance,
    reset_peak_rss,
    rss_mb,
    run_children,
    write_json,
)
from _lowmem import LOWMEM, freeze_window, peft_config, trainer_optimizer

CONFIGS = {
    "full_ft": "full fine-tuning",
    "lora_r16": "LoRA r16, all linear",
    "cofitune_coarse": "CoFiTune, default window, no mask",
    "cofitune_mask": "CoFiTune, default window, mask (update)",
    "cofitune_mask_gradient": "CoFiTune, default window, mask (gradient)",
    **{name: spec[0] for name, spec in LOWMEM.items()},
}


def checkpointing_of(model) -> dict:
    """Whether the decoder layers are checkpointed, and with which `torch.utils.checkpoint` keyword arguments."""
    layer = decoder_layers(model)[0]
    enabled = bool(getattr(layer, "gradient_checkpointing", False))
    func = getattr(layer, "_gradient_checkpointing_func", None)
    kwargs = dict(getattr(func, "keywords", {}) or {}) if enabled else {}
    return {"enabled": enabled, "kwargs": {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, str))}}


def child(name: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import cofitune_peft  # noqa: F401
    from cofitune_peft import CoFiTuneConfig, Importance
    from cofitune_peft.kit.loading import load_smollm2

    import_mb = current_rss_mb()
    model, tokenizer = load_smollm2(dtype=getattr(torch, args.dtype))
    loaded_mb = rss_mb()
    total_steps = args.steps + args.warmup
    texts = long_texts(tokenizer, args.length, args.batch)
    dataset = Dataset.from_dict({"text": texts})

    config_overrides, trainer_kwargs = {}, {}
    if name in LOWMEM:
        importance = Importance.load(args.importance) if args.importance else random_importance(model.config)
        peft_config_ = peft_config(name, importance)
        if peft_config_ is None:
            freeze_window(model)
        config_overrides, trainer_kwargs = trainer_optimizer(name)
    elif name == "full_ft":
        peft_config_ = None
    elif name == "lora_r16":
        from peft import LoraConfig

        peft_config_ = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    elif name == "cofitune_coarse":
        peft_config_ = CoFiTuneConfig()
    else:
        mode = "gradient" if name == "cofitune_mask_gradient" else "update"
        importance = Importance.load(args.importance) if args.importance else random_importance(model.config)
        peft_config_ = CoFiTuneConfig(importance=importance, softmask_mode=mode)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._start = 0.0

        def on_train_begin(self, targs, state, control, **kwargs):
            self.reset = reset_peak_rss()  # from here on: the training loop's own peak

        def on_step_begin(self, targs, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="bench_trainer-") as out_dir:
        config = SFTConfig(
            output_dir=out_dir,
            use_cpu=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            max_steps=total_steps,
            per_device_train_batch_size=args.batch,
            max_length=args.length,
            seed=0,
            data_seed=0,
            **config_overrides,
        )
        if "optimizer_cls_and_kwargs" in trainer_kwargs:
            cls, kwargs = trainer_kwargs["optimizer_cls_and_kwargs"]
            trainer_kwargs = {"optimizer_cls_and_kwargs": (cls, {**kwargs, "training_args": config})}
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config_,
            callbacks=[timer],
            **trainer_kwargs,
        )
        lengths = sorted({len(ids) for ids in trainer.train_dataset["input_ids"]})
        if lengths != [args.length]:
            raise SystemExit(f"expected every row truncated to {args.length} tokens, got lengths {lengths}")
        init_mb = rss_mb()
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
        peak_mb = rss_mb()
        peak_train_mb = peak_rss_since_reset_mb() if getattr(timer, "reset", False) else None
        probe = tokenizer(texts[: args.batch], truncation=True, max_length=args.length, return_tensors="pt")
        in_backward = layers_in_backward(trainer.model, probe["input_ids"])
        ckpt = checkpointing_of(trainer.model)
        optim = str(getattr(config.optim, "value", config.optim))
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
        optimizer_class = type(inner).__name__
    if len(timer.times) != total_steps:
        raise SystemExit(f"timed {len(timer.times)} steps, expected {total_steps}")
    times = timer.times[args.warmup :]
    return {
        "name": name,
        "trainable_params": trainable,
        "step_s_median": statistics.median(times),
        "step_s_all": timer.times,
        "warmup_steps": args.warmup,
        "peak_rss_mb": peak_mb,
        "peak_train_rss_mb": peak_train_mb,
        "import_rss_mb": import_mb,
        "rss_after_load_mb": loaded_mb,
        "rss_after_trainer_init_mb": init_mb,
        "layers_in_backward": in_backward,
        "num_layers": model.config.num_hidden_layers,
        "gradient_checkpointing": ckpt,
        "sft_config_gradient_checkpointing": bool(
            getattr(config, "activation_checkpointing", getattr(config, "gradient_checkpointing", False))
        ),
        "optim": optim,
        "optimizer_class": optimizer_class,
        "threads": args.threads,
        "batch": [args.batch, args.length],
        "dtype": args.dtype,
        "max_grad_norm": config.max_grad_norm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (dropped from the median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--importance", default=None, help="an importance file (default: random, as bench_step.py)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's dtype")
    parser.add_argument("--configs", nargs="*", default=[c for c in CONFIGS if c not in LOWMEM], choices=list(CONFIGS))
    parser.add_argument("--out", default="benchmarks/results/trainer.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    argv = ["--steps", args.steps, "--warmup", args.warmup, "--threads", args.threads, "--batch", args.batch]
    argv += ["--length", args.length, "--dtype", args.dtype]
    argv += ["--importance", args.importance] if args.importance else []
    results = run_children(__file__, args.configs, argv, args.threads)

    def ratio(a, b, key="step_s_median"):
        return results[a][key] / results[b][key] if a in results and b in results else float("nan")

    rows = []
    for name, r in results.items():
        ckpt = r["gradient_checkpointing"]
        reentrant = ckpt["kwargs"].get("use_reentrant", "default")
        rows.append(
            {
                "configuration": CONFIGS[name],
                "trainable M": r["trainable_params"] / 1e6,
                "step s (median)": r["step_s_median"],
                "step / LoRA": ratio(name, "lora_r16"),
                "step / full": ratio(name, "full_ft"),
                "peak RSS MB": r["peak_rss_mb"],
                "train peak MB": r.get("peak_train_rss_mb") or float("nan"),
                "step / freeze": ratio(name, "freeze_bf16"),
                "peak / LoRA": ratio(name, "lora_r16", "peak_rss_mb"),
                "peak / freeze": ratio(name, "freeze_bf16", "peak_rss_mb"),
                "layers in bwd": f"{r['layers_in_backward']}/{r['num_layers']}",
                "checkpointing": f"on (use_reentrant={reentrant})" if ckpt["enabled"] else "off",
            }
        )
    table = markdown(rows)
    first = next(iter(results.values()))
    print(
        f"SmolLM2-135M-Instruct {args.dtype}, TRL SFTTrainer, batch {args.batch}x{args.length}, {args.threads} threads, "
        f"optim {first['optim']}, median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(table)
    summary = {
        "mask_overhead_pct": 100 * (ratio("cofitune_mask", "cofitune_coarse") - 1),
        "mask_gradient_overhead_pct": 100 * (ratio("cofitune_mask_gradient", "cofitune_coarse") - 1),
        "cofitune_mask_step_vs_lora": ratio("cofitune_mask", "lora_r16"),
        "cofitune_mask_step_vs_full": ratio("cofitune_mask", "full_ft"),
        "cofitune_coarse_step_vs_lora": ratio("cofitune_coarse", "lora_r16"),
        "cofitune_mask_peak_vs_lora": ratio("cofitune_mask", "lora_r16", "peak_rss_mb"),
        "gradient_checkpointing": {name: r["gradient_checkpointing"] for name, r in results.items()},
        "lowmem_peak_vs_freeze": ratio("cofitune_lowmem", "freeze_bf16", "peak_rss_mb"),
        "lowmem_peak_vs_lora": ratio("cofitune_lowmem", "lora_r16", "peak_rss_mb"),
        "lowmem_step_vs_freeze": ratio("cofitune_lowmem", "freeze_bf16"),
        "lowmem_step_vs_lora": ratio("cofitune_lowmem", "lora_r16"),
    }
    print(f"mask overhead (mask update vs coarse step time): {summary['mask_overhead_pct']:+.1f}%")
    print(f"mask overhead (mask gradient vs coarse step time): {summary['mask_gradient_overhead_pct']:+.1f}%")
    print(json.dumps({k: v for k, v in summary.items() if k != "gradient_checkpointing"}, indent=2))
    write_json(args.out, {"args": vars(args), "results": results, "summary": summary, "table": table})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
