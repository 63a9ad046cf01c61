"""GPU check: measured step time and peak CUDA memory of CoFiTune vs LoRA r16 vs QLoRA r16 vs full fine-tuning vs
the freeze-tuning peer on random-weight Llama models (1B and 8B shapes), bf16, SDPA, gradient checkpointing, against
the memory model; CoFiTune also with bf16 deltas and with the recommended low-memory optimizer (`CoFiTuneAdamW`:
stochastic rounding, int8 momentum, factored second moment), unfused and fused into the backward pass.

    python benchmarks/gpu/memory_check.py [--shapes llama-3.2-1b llama-3-8b] [--out gpu_check.json]
    python benchmarks/gpu/memory_check.py --device cpu --tiny      # CPU smoke test of the same code path

Each configuration runs in its own child process, so `torch.cuda.max_memory_allocated` is its own. Needs only
torch, transformers, peft, accelerate (and bitsandbytes for QLoRA and the int8 optimizer states, skipped when it does
not import). By default the 1B shape runs the four base methods and the peer, the 8B shape every configuration
(`DEFAULT_METHODS`), which keeps `check.sh` within 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# name -> (memory-model method, estimate kwargs, CoFiTuneConfig.delta_dtype, optimizer kwargs for CoFiTuneAdamW or None)
LOW_MEMORY = {"state_dtype": "int8", "second_moment": "factored"}
CONFIGS = {
    "cofitune": ("cofitune", {}, None, None),
    "lora": ("lora", {}, None, None),
    "qlora": ("qlora", {}, None, None),
    "full": ("full", {}, None, None),
    "freeze": ("freeze", {}, None, None),
    "cofitune_bf16": ("cofitune", {"trainable_dtype": "bfloat16"}, "bfloat16", None),
    "cofitune_lowmem": (
        "cofitune", {"trainable_dtype": "bfloat16", "optimizer": "cofitune_adamw", **LOW_MEMORY}, "bfloat16",
        LOW_MEMORY,
    ),
    "cofitune_lowmem_fused": (
        "cofitune", {"trainable_dtype": "bfloat16", "optimizer": "cofitune_adamw", "fused_step": True, **LOW_MEMORY},
        "bfloat16", {**LOW_MEMORY, "fused_backward": True},
    ),
}  # fmt: skip
NEEDS_BNB = ("qlora", "cofitune_lowmem", "cofitune_lowmem_fused")
# the most telling first: a run cut short by `check.sh`'s time limit keeps what finished (written after each row)
DEFAULT_METHODS = {
    "llama-3-8b": ["lora", "cofitune", "cofitune_lowmem", "freeze", "cofitune_lowmem_fused", "cofitune_bf16", "qlora",
                   "full"],
    "llama-3.2-1b": ["cofitune", "lora", "full", "freeze"],
}  # fmt: skip
TINY = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256,
}  # fmt: skip


def config_for(shape: str):
    from cofitune_peft.kit.memory import load_config

    return load_config(TINY if shape == "tiny" else shape)


def bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def build(shape: str, method: str, device: str):
    """A random-weight model of `shape` prepared for `method`, plus the list of trainable parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    import cofitune_peft  # noqa: F401

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = config_for(shape)
    config._attn_implementation = "sdpa"
    kwargs = {}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if method == "qlora":  # quantise the random weights through a save/load round trip
        import tempfile

        tmp = tempfile.mkdtemp()
        model.save_pretrained(tmp)
        del model
        torch.cuda.empty_cache()
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, device_map={"": 0}, **kwargs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    kind, _, delta_dtype, _ = CONFIGS[method]
    if kind == "freeze":  # the same window trained in place; checkpointing made the embeddings' output require grad
        from cofitune_peft.kit.memory import _decoder_layers, cofitune_plan

        model.requires_grad_(False)
        for index, names in cofitune_plan(model.config)[2].items():
            for name in names:
                _decoder_layers(model)[index].get_submodule(name).weight.requires_grad_(True)
    elif method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        model.enable_input_require_grads()
    elif kind == "cofitune":
        from peft import get_peft_model

        from cofitune_peft import CoFiTuneConfig

        model = get_peft_model(model, CoFiTuneConfig(delta_dtype=delta_dtype))
        model.enable_input_require_grads()  # what Trainer/TRL do; CoFiTune removes it again
    return model, [p for p in model.parameters() if p.requires_grad]


def child(shape: str, method: str, device: str, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
    import torch

    model, params = build(shape, method, device)
    optimizer_kwargs = CONFIGS[method][3]
    if optimizer_kwargs is None:
        opt = torch.optim.AdamW(params, lr=1e-5)
    else:
        from cofitune_peft import CoFiTuneAdamW

        opt = CoFiTuneAdamW(params, lr=1e-5, **optimizer_kwargs)
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    model.train()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"step_s_median": statistics.median(times), "peak_allocated_bytes": peak,
            "trainable_params": sum(p.numel() for p in params)}  # fmt: skip


def predict(shape: str, method: str, device: str, batch: int, seq_len: int) -> dict:
    from cofitune_peft.kit.memory import estimate_training_memory

    dtype = "bfloat16" if device == "cuda" else "float32"
    kind, kwargs, _, _ = CONFIGS[method]
    est = estimate_training_memory(config_for(shape), kind, batch=batch, seq_len=seq_len, dtype=dtype,
                                   checkpointing=True, overhead_bytes=0, device=device, **kwargs)  # fmt: skip
    return {"predicted_allocated_bytes": est.peak_allocated_bytes, "predicted_trainable": est.trainable_params}


def fits(shape: str, method: str, device: str, batch: int, seq_len: int, margin: float = 0.85) -> bool:
    """Run a configuration only when the model predicts it fits in `margin` of the free device memory."""
    if device != "cuda":
        return True
    import torch

    free, _ = torch.cuda.mem_get_info()
    return predict(shape, method, device, batch, seq_len)["predicted_allocated_bytes"] < margin * free


def rows_table(rows: list[dict]) -> str:
    lines = ["| model | method | trainable M | step s | peak GiB measured | peak GiB predicted | error |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['shape']} | {r['method']} | - | - | - | "
                         f"{r['predicted_allocated_bytes'] / 2**30:.2f} | skipped: {r['skipped']} |")  # fmt: skip
            continue
        meas = r["peak_allocated_bytes"]
        pred = r["predicted_allocated_bytes"]
        err = f"{(pred - meas) / meas:+.1%}" if meas else "-"
        meas_s = f"{meas / 2**30:.2f}" if meas else "- (cpu)"
        lines.append(f"| {r['shape']} | {r['method']} | {r['trainable_params'] / 1e6:.1f} | {r['step_s_median']:.3f} "
                     f"| {meas_s} | {pred / 2**30:.2f} | {err} |")  # fmt: skip
    return "\n".join(lines)


def run_all(shapes, methods, device, batch, seq_len, steps, warmup, timeout) -> list[dict]:
    rows = []
    for shape in shapes:
        for method in methods:
            row = {"shape": shape, "method": method, **predict(shape, method, device, batch, seq_len)}
            if (method == "qlora" and device != "cuda") or (method in NEEDS_BNB and not bnb_available()):
                row["skipped"] = "bitsandbytes/cuda unavailable"
            elif not fits(shape, method, device, batch, seq_len):
                row["skipped"] = "predicted not to fit"
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", shape, method, "--device", device,
                       "--batch", str(batch), "--seq-len", str(seq_len), "--steps", str(steps),
                       "--warmup", str(warmup)]  # fmt: skip
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                except subprocess.TimeoutExpired:
                    row["skipped"] = f"timed out after {timeout}s"
                    rows.append(row)
                    continue
                if proc.returncode != 0:
                    row["skipped"] = "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
                else:
                    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["llama-3-8b", "llama-3.2-1b"])
    parser.add_argument(
        "--methods",
        nargs="*",
        default=None,
        choices=list(CONFIGS),
        help="default: DEFAULT_METHODS per shape (every configuration for other shapes)",
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="one tiny Llama shape (CPU smoke test)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=150, help="seconds per configuration")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.batch, args.seq_len, args.steps, args.warmup)))
        return 0
    shapes = ["tiny"] if args.tiny else args.shapes
    rows = []
    for shape in shapes:
        for method in args.methods or DEFAULT_METHODS.get(shape, list(CONFIGS)):
            rows += run_all([shape], [method], args.device, args.batch, args.seq_len, args.steps, args.warmup,
                            args.timeout)  # fmt: skip
            print(rows_table(rows[-1:]).splitlines()[-1], flush=True)
            if args.out:  # after every row: a run stopped by a time limit keeps what finished
                with open(args.out, "w") as f:
                    json.dump({"args": vars(args), "rows": rows, "table": rows_table(rows)}, f, indent=1)
    print(rows_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
