"""`cofitune memory MODEL`: peak training memory per GPU for CoFiTune, LoRA r16, QLoRA r16, full fine-tuning and freeze
tuning of CoFiTune's window.

The model is built on the meta device from its config (a local config.json or folder, a Hub id, or a name from
`KNOWN_SHAPES`), so no weights are read. See `cofitune_peft.kit.memory` for the formulas.
"""

from __future__ import annotations

import argparse
import json

from .memory import CUDA_OVERHEAD_BYTES, GIB, KNOWN_SHAPES, compare_methods
from .memory_optim import OPTIMIZERS, SECOND_MOMENTS, STATE_DTYPES

GPUS = (24, 40, 80)


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cofitune memory`."""
    parser.add_argument("model", help=f"config.json, model folder, Hub id or one of {', '.join(KNOWN_SHAPES)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument(
        "--optimizer",
        default="adamw",
        choices=list(OPTIMIZERS),
        help="adamw (torch), adamw_fused, adamw8bit (bitsandbytes), cofitune_adamw (CoFiTuneAdamW)",
    )
    parser.add_argument(
        "--delta-dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="the adapters' dtype (CoFiTuneConfig.delta_dtype; PEFT's default: fp32)",
    )
    parser.add_argument("--state-dtype", default=None, choices=list(STATE_DTYPES), help="the optimizer moments' dtype")
    parser.add_argument("--second-moment", default="full", choices=list(SECOND_MOMENTS), help="cofitune_adamw")
    parser.add_argument("--no-momentum", action="store_true", help="cofitune_adamw with betas[0] = 0")
    parser.add_argument("--fused-step", action="store_true", help="cofitune_adamw: the step fused into the backward")
    parser.add_argument("--base-quant", default="none", choices=["none", "4bit", "8bit"], help="for cofitune/lora")
    parser.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    parser.add_argument("--mask-mode", default="update", choices=["update", "gradient", "none"])
    parser.add_argument("--layers", type=int, nargs=2, default=None, metavar=("A", "B"), help="CoFiTune window")
    parser.add_argument("--methods", nargs="*", default=["cofitune", "lora", "qlora", "full", "freeze"])
    parser.add_argument("--overhead-gib", type=float, default=CUDA_OVERHEAD_BYTES / GIB, help="CUDA context + slack")
    parser.add_argument("--json", default=None, help="also write the estimates to this JSON file")


def table(estimates, gpus=GPUS) -> str:
    """A markdown table: method, trainable params, components in GiB, peak, which GPU sizes it fits."""
    head = (
        "| method | trainable M | layers in bwd | weights | trainable+grad+optim | activations | logits | peak GiB |"
    )
    lines = [head + "".join(f" {g} GB |" for g in gpus), "|" + "---|" * (8 + len(gpus))]
    for e in estimates:
        c = e.components
        train = (c["trainable_weights"] + c["gradients"] + c["optimizer_states"] + c["optimizer_temporaries"]) / GIB
        fits = "".join(f" {'yes' if e.fits(g) else 'no'} |" for g in gpus)
        name = e.method + (f" ({e.settings['base_quant']} base)" if e.settings["base_quant"] != "none" else "")
        lines.append(
            f"| {name} | {e.trainable_params / 1e6:.1f} | {e.layers_in_backward}/{e.num_layers} | "
            f"{c['base_weights'] / GIB:.2f} | {train:.2f} | {c['activations'] / GIB:.2f} | {c['logits'] / GIB:.2f} | "
            f"{e.peak_gib:.2f} |{fits}"
        )
    return "\n".join(lines)


def memory_command(args: argparse.Namespace) -> int:
    base_quant = None if args.base_quant == "none" else args.base_quant
    estimates = compare_methods(
        args.model,
        [m for m in args.methods if not (m in ("full", "freeze") and base_quant)],
        batch=args.batch,
        seq_len=args.seq_len,
        dtype=args.dtype,
        optimizer=args.optimizer,
        base_quant=base_quant,
        checkpointing=not args.no_checkpointing,
        mask_mode=args.mask_mode,
        layers=tuple(args.layers) if args.layers else None,
        overhead_bytes=args.overhead_gib * GIB,
        trainable_dtype=args.delta_dtype,
        state_dtype=args.state_dtype,
        second_moment=args.second_moment,
        momentum=not args.no_momentum,
        fused_step=args.fused_step,
    )
    print(
        f"{args.model}: batch {args.batch} x {args.seq_len} tokens, {args.dtype}, {args.optimizer}, checkpointing "
        f"{'off' if args.no_checkpointing else 'on'}, overhead {args.overhead_gib:.2f} GiB (estimate from shapes)"
    )
    print(table(estimates))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([e.to_dict() for e in estimates], f, indent=1)
    return 0
