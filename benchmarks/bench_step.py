"""Training step time and peak memory: CoFiTune vs LoRA r16 (all linear) vs full fine-tuning on SmolLM2-135M.

One run of this script measures every configuration, each in its own child process (so that each one's peak RSS is
its own), on the same batch (4 x 256 tokens), with AdamW, and prints ratios against LoRA and full fine-tuning.

    python benchmarks/bench_step.py [--steps 6] [--threads 2] [--out benchmarks/results/step.json]

The low-precision table (`_lowmem.LOWMEM`: fp32 / bf16 deltas, stochastic rounding, 8-bit and factored states, the
fused step, the freeze-tuning peer) runs on the model in bf16:

    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/bench_step.py --dtype bfloat16 --threads 1 \
        --configs lora_r16 full_ft freeze_bf16 cofitune_fp32 cofitune_bf16 cofitune_bf16_sr cofitune_bf16_8bit \
        cofitune_bf16_fused cofitune_lowmem cofitune_lowmem_fused --out benchmarks/results/step_bf16.json

Each child also records its RSS after the imports (`import_rss_mb`) and its peak RSS during the timed loop alone
(`peak_train_rss_mb`: the peak is reset once the model, adapter and optimizer are built), which the memory model's
validation (`benchmarks/gpu/memory_table.py`) compares with its prediction. Run it alone: two torch processes on two
cores slow each other down many times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import (
    current_rss_mb,
    markdown,
    peak_rss_since_reset_mb,
    random_importance,
    reset_peak_rss,
    rss_mb,
    run_children,
    write_json,
)
from _lowmem import LOWMEM, build_model, plain_optimizer

CONFIGS = {
    "full_ft": "full fine-tuning",
    "lora_r16": "LoRA r16, all linear",
    "cofitune_coarse": "CoFiTune, default window, no mask",
    "cofitune_mask": "CoFiTune, default window, mask (update)",
    "cofitune_mask_gradient": "CoFiTune, default window, mask (gradient)",
    "cofitune_mask_ckpt": "CoFiTune mask + checkpointing (Trainer-style)",
    **{name: spec[0] for name, spec in LOWMEM.items()},
}


def child(name: str, steps: int, threads: int, batch: int, length: int, dtype: str = "float32") -> dict:
    import torch

    torch.set_num_threads(threads)
    import cofitune_peft  # noqa: F401
    from cofitune_peft import CoFiTuneConfig
    from cofitune_peft.kit.loading import load_smollm2

    import_mb = current_rss_mb()
    model, _ = load_smollm2(dtype=getattr(torch, dtype))
    loaded_mb = rss_mb()
    cfg = model.config
    opt = None
    if name in LOWMEM:
        trainable = build_model(name, model, random_importance(cfg))
    elif name == "full_ft":
        trainable = model
    elif name == "lora_r16":
        from peft import LoraConfig, get_peft_model

        trainable = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    else:
        from peft import get_peft_model

        importance = None if name == "cofitune_coarse" else random_importance(cfg)
        mode = "gradient" if name == "cofitune_mask_gradient" else "update"
        trainable = get_peft_model(model, CoFiTuneConfig(importance=importance, softmask_mode=mode))
        if name == "cofitune_mask_ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            trainable.enable_input_require_grads()
    params = [p for p in trainable.parameters() if p.requires_grad]
    if name in LOWMEM:
        opt = plain_optimizer(name, params, lr=1e-5)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, length), generator=g)
    trainable.train()
    reset = reset_peak_rss()
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        loss = trainable(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    return {
        "name": name,
        "trainable_params": sum(p.numel() for p in params),
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "peak_rss_mb": rss_mb(),
        "peak_train_rss_mb": peak_rss_since_reset_mb() if reset else None,
        "import_rss_mb": import_mb,
        "rss_after_load_mb": loaded_mb,
        "threads": threads,
        "dtype": dtype,
        "trainable_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in params}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's dtype")
    parser.add_argument("--configs", nargs="*", default=[c for c in CONFIGS if c not in LOWMEM], choices=list(CONFIGS))
    parser.add_argument("--out", default="benchmarks/results/step.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads, args.batch, args.length, args.dtype)))
        return

    argv = ["--steps", args.steps, "--threads", args.threads, "--batch", args.batch, "--length", args.length]
    argv += ["--dtype", args.dtype]
    results = run_children(__file__, args.configs, argv, args.threads)

    def ratio(a, b, key):
        return results[a][key] / results[b][key] if a in results and b in results else float("nan")

    rows = []
    for name, r in results.items():
        rows.append(
            {
                "configuration": CONFIGS[name],
                "trainable M": r["trainable_params"] / 1e6,
                "step s": r["step_s_median"],
                "peak RSS MB": r["peak_rss_mb"],
                "train peak MB": r.get("peak_train_rss_mb") or float("nan"),
                "step / LoRA": ratio(name, "lora_r16", "step_s_median"),
                "step / full": ratio(name, "full_ft", "step_s_median"),
                "step / freeze": ratio(name, "freeze_bf16", "step_s_median"),
                "peak / LoRA": ratio(name, "lora_r16", "peak_rss_mb"),
                "peak / freeze": ratio(name, "freeze_bf16", "peak_rss_mb"),
            }
        )
    table = markdown(rows)
    print(table)
    summary = {
        "cofitune_mask_step_vs_lora": ratio("cofitune_mask", "lora_r16", "step_s_median"),
        "cofitune_mask_step_vs_full": ratio("cofitune_mask", "full_ft", "step_s_median"),
        "cofitune_mask_peak_vs_lora": ratio("cofitune_mask", "lora_r16", "peak_rss_mb"),
        "mask_overhead": ratio("cofitune_mask", "cofitune_coarse", "step_s_median") - 1,
        "lowmem_peak_vs_freeze": ratio("cofitune_lowmem", "freeze_bf16", "peak_rss_mb"),
        "lowmem_peak_vs_lora": ratio("cofitune_lowmem", "lora_r16", "peak_rss_mb"),
        "lowmem_step_vs_freeze": ratio("cofitune_lowmem", "freeze_bf16", "step_s_median"),
        "lowmem_step_vs_lora": ratio("cofitune_lowmem", "lora_r16", "step_s_median"),
    }
    print(json.dumps(summary, indent=2))
    write_json(args.out, {"args": vars(args), "results": results, "summary": summary, "table": table})


if __name__ == "__main__":
    main()
