"""The memory model's table for 8B-70B shapes and its validation against the committed SmolLM2 CPU runs.

    python benchmarks/gpu/memory_table.py [--out benchmarks/results/memory_model.json]

No GPU and no weights needed: every model is built on the meta device from `KNOWN_SHAPES`. The live validation in
bf16 (`live_validation`) reads `step_bf16.json` and `trainer_bf16.json` (bench_step.py / bench_trainer.py with
`--dtype bfloat16` and `MALLOC_MMAP_THRESHOLD_=131072`) when they exist: each configuration's peak RSS of the training
loop against the prediction for the CPU (`device="cpu"`, the plain loop's own loss or TRL's chunked one, no CUDA
overhead) plus the RSS the same child had after its imports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cofitune_peft.kit.memory import Shapes, estimate_training_memory, load_config, meta_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from _lowmem import estimate_kwargs  # benchmarks/_lowmem.py: how each live configuration is built

SHAPES = ("llama-3-8b", "qwen2.5-7b", "llama-2-13b", "llama-3-70b")
# The recommended low-memory configuration with a bf16 base: bf16 deltas trained by CoFiTuneAdamW with stochastic
# rounding, an int8 first moment and Adafactor's factored second moment.
RECOMMENDED = "CoFiTune, bf16 deltas, int8 momentum + factored 2nd moment (recommended)"
LOW_MEMORY = {"trainable_dtype": "bfloat16", "optimizer": "cofitune_adamw", "state_dtype": "int8",
              "second_moment": "factored"}  # fmt: skip
GPUS = (24, 40, 80)
# name -> (method, extra settings)
VARIANTS = {
    "full fine-tuning (bf16, AdamW)": ("full", {}),
    "LoRA r16 all-linear": ("lora", {}),
    "QLoRA r16 (nf4 base)": ("qlora", {}),
    "CoFiTune (bf16 base)": ("cofitune", {}),
    "CoFiTune, 4-bit base": ("cofitune", {"base_quant": "4bit"}),
    "CoFiTune, 4-bit base, 8-bit AdamW": ("cofitune", {"base_quant": "4bit", "optimizer": "adamw8bit"}),
    "CoFiTune, 4-bit base, 8-bit AdamW, bf16 deltas": (
        "cofitune",
        {"base_quant": "4bit", "optimizer": "adamw8bit", "trainable_dtype": "bfloat16"},
    ),
    # bf16 base, deltas in bf16 (CoFiTuneConfig(delta_dtype="bfloat16")), the optimizer's state made small
    "CoFiTune, bf16 deltas, AdamW (bf16 states)": ("cofitune", {"trainable_dtype": "bfloat16"}),
    "CoFiTune, bf16 deltas, 8-bit AdamW": ("cofitune", {"trainable_dtype": "bfloat16", "optimizer": "adamw8bit"}),
    RECOMMENDED: ("cofitune", LOW_MEMORY),
    "CoFiTune, recommended + fused step": ("cofitune", {**LOW_MEMORY, "fused_step": True}),
    "CoFiTune, bf16 deltas, no momentum + factored 2nd moment, fused step": (
        "cofitune", {**LOW_MEMORY, "state_dtype": "float32", "momentum": False, "fused_step": True},
    ),
    "CoFiTune, 4-bit base, recommended + fused step": ("cofitune", {**LOW_MEMORY, "base_quant": "4bit",
                                                                    "fused_step": True}),
    # the freeze-tuning peer: the same window trained in place in bf16; under checkpointing every layer is in the
    # backward pass (transformers' enable_input_require_grads, as LLaMA-Factory and the Trainer set it up)
    "freeze tuning (same window, bf16 in place, AdamW)": ("freeze", {}),
    "freeze tuning, 8-bit AdamW": ("freeze", {"optimizer": "adamw8bit"}),
    "freeze tuning, int8 momentum + factored 2nd moment, fused step": (
        "freeze", {**{k: v for k, v in LOW_MEMORY.items() if k != "trainable_dtype"}, "fused_step": True},
    ),
}  # fmt: skip
# committed CPU runs: (file, configuration, method, checkpointing, mask mode)
MEASURED = {
    ("step.json", "full_ft"): ("full", False, "update"),
    ("step.json", "lora_r16"): ("lora", False, "update"),
    ("step.json", "cofitune_coarse"): ("cofitune", False, "none"),
    ("step.json", "cofitune_mask"): ("cofitune", False, "update"),
    ("step.json", "cofitune_mask_gradient"): ("cofitune", False, "gradient"),
    ("step.json", "cofitune_mask_ckpt"): ("cofitune", True, "update"),
    ("trainer.json", "full_ft"): ("full", True, "update"),
    ("trainer.json", "lora_r16"): ("lora", True, "update"),
    ("trainer.json", "cofitune_coarse"): ("cofitune", True, "none"),
    ("trainer.json", "cofitune_mask"): ("cofitune", True, "update"),
    ("trainer.json", "cofitune_mask_gradient"): ("cofitune", True, "gradient"),
}
# RSS of a process that has imported torch, transformers, peft and cofitune_peft (measured on the project's CPU
# machine, torch 2.13 cpu): the CPU stand-in for what the model leaves out of a process's RSS.
CPU_IMPORT_RSS_MIB = 434


def validation(results_dir: str) -> list[dict]:
    """Prediction (CUDA overhead 0, plus the import RSS) against each committed peak RSS, fp32, batch 4 x 256."""
    rows = []
    for (file, name), (method, ckpt, mode) in MEASURED.items():
        with open(os.path.join(results_dir, file)) as f:
            measured = json.load(f)["results"][name]["peak_rss_mb"]
        est = estimate_training_memory(
            "smollm2-135m", method, batch=4, seq_len=256, dtype="float32", checkpointing=ckpt, mask_mode=mode,
            overhead_bytes=0,
        )  # fmt: skip
        predicted = est.peak_bytes / 2**20 + CPU_IMPORT_RSS_MIB
        rows.append(
            {
                "file": file, "configuration": name, "method": method, "checkpointing": ckpt, "mask_mode": mode,
                "predicted_mib": round(predicted, 1), "measured_mib": round(measured, 1),
                "error": round((predicted - measured) / measured, 4),
            }
        )  # fmt: skip
    return rows


# The bf16 table's configurations (benchmarks/_lowmem.py), LoRA r16 and full fine-tuning.
LIVE = ("lora_r16", "full_ft", "freeze_bf16", "cofitune_fp32", "cofitune_bf16", "cofitune_bf16_sr",
        "cofitune_bf16_8bit", "cofitune_bf16_fused", "cofitune_lowmem", "cofitune_lowmem_fused", "cofitune_nomom")  # fmt: skip


def live_validation(results_dir: str, files=("step_bf16.json", "trainer_bf16.json")) -> list[dict]:
    """Prediction (CPU, overhead 0, plus the child's own RSS after its imports) against the training loop's peak RSS
    (`peak_train_rss_mb`, with `MALLOC_MMAP_THRESHOLD_` so that freed memory leaves the RSS) of each bf16 run found."""
    rows = []
    for file in files:
        path = os.path.join(results_dir, file)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            data = json.load(f)
        trainer = file.startswith("trainer")
        args = data["args"]
        for name, result in data["results"].items():
            if name not in LIVE or not result.get("peak_train_rss_mb"):
                continue
            est = estimate_training_memory(
                "smollm2-135m", batch=args["batch"], seq_len=args["length"], dtype="bfloat16", checkpointing=trainer,
                device="cpu", loss="trl" if trainer else "transformers", overhead_bytes=0,
                **estimate_kwargs(name, trainer=trainer),
            )  # fmt: skip
            predicted = est.peak_bytes / 2**20 + result["import_rss_mb"]
            measured = result["peak_train_rss_mb"]
            rows.append(
                {
                    "file": file, "configuration": name, "predicted_mib": round(predicted, 1),
                    "measured_mib": round(measured, 1), "error": round((predicted - measured) / measured, 4),
                    "import_rss_mib": round(result["import_rss_mb"], 1),
                    "components_mib": {k: round(v / 2**20, 1) for k, v in est.components.items()},
                }
            )  # fmt: skip
    return rows


def shape_table() -> list[dict]:
    rows = []
    for shape in SHAPES:
        config = load_config(shape)
        shapes = Shapes.from_model(meta_model(config))
        for label, (method, extra) in VARIANTS.items():
            est = estimate_training_memory(config, method, batch=1, seq_len=2048, shapes=shapes, **extra)
            rows.append(
                {
                    "shape": shape, "configuration": label, "peak_gib": round(est.peak_gib, 2),
                    "fits": {g: est.fits(g) for g in GPUS}, "estimate": est.to_dict(),
                }
            )  # fmt: skip
    return rows


def markdown(rows) -> str:
    lines = ["| model | configuration | trainable M | peak GiB | " + " | ".join(f"{g} GB" for g in GPUS) + " |"]
    lines.append("|" + "---|" * (4 + len(GPUS)))
    for r in rows:
        fits = " | ".join("yes" if r["fits"][g] else "no" for g in GPUS)
        lines.append(
            f"| {r['shape']} | {r['configuration']} | {r['estimate']['trainable_params'] / 1e6:.0f} | "
            f"{r['peak_gib']:.1f} | {fits} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/memory_model.json")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()
    val = validation(args.results)
    live = live_validation(args.results)
    rows = shape_table()
    table = markdown(rows)
    print(table)
    for v in val:
        print(f"{v['file']:13s} {v['configuration']:24s} predicted {v['predicted_mib']:7.0f} MiB  measured "
              f"{v['measured_mib']:7.0f} MiB  error {v['error']:+.1%}")  # fmt: skip
    for v in live:
        print(f"{v['file']:18s} {v['configuration']:24s} predicted {v['predicted_mib']:7.0f} MiB  measured "
              f"{v['measured_mib']:7.0f} MiB  error {v['error']:+.1%}")  # fmt: skip
    settings = "bf16 base/activations, batch 1 x 2048 tokens, gradient checkpointing on, AdamW unless said, "
    settings += f"adapters fp32 unless said, {1.0:.1f} GiB CUDA overhead, one GPU, no sharding"
    with open(args.out, "w") as f:
        json.dump({"settings": settings, "gpus_gib": GPUS, "table": table, "shapes": rows, "validation": val,
                   "live_validation_bf16": live}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
