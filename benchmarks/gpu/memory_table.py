"""The memory model's table for 8B-70B shapes and its validation against the committed SmolLM2 CPU runs.

    python benchmarks/gpu/memory_table.py [--out benchmarks/results/memory_model.json]

No GPU and no weights needed: every model is built on the meta device from `KNOWN_SHAPES`.
"""

from __future__ import annotations

import argparse
import json
import os

from cofitune_peft.kit.memory import Shapes, estimate_training_memory, load_config, meta_model

SHAPES = ("llama-3-8b", "qwen2.5-7b", "llama-2-13b", "llama-3-70b")
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
}
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
    rows = shape_table()
    table = markdown(rows)
    print(table)
    for v in val:
        print(f"{v['file']:13s} {v['configuration']:24s} predicted {v['predicted_mib']:7.0f} MiB  measured "
              f"{v['measured_mib']:7.0f} MiB  error {v['error']:+.1%}")  # fmt: skip
    settings = "bf16 base/activations, batch 1 x 2048 tokens, gradient checkpointing on, AdamW unless said, "
    settings += f"adapters fp32 unless said, {1.0:.1f} GiB CUDA overhead, one GPU, no sharding"
    with open(args.out, "w") as f:
        json.dump({"settings": settings, "gpus_gib": GPUS, "table": table, "shapes": rows, "validation": val}, f,
                  indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
