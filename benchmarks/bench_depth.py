"""Training step time vs the depth of CoFiTune's window: nothing below the window enters the backward pass.

SmolLM2-135M-Instruct (30 layers, fp32, CPU), plain PyTorch loop (AdamW, batch 4 x 256 tokens of real prose from
`cofitune_peft.kit.data.general_texts(split="eval")`), CoFiTune windows of the same width (4 layers, FFN up/down, no mask)
placed at different depths, with LoRA r16 (all linear) and full fine-tuning as references. A window (a, b) trains the
same number of weights wherever it sits, but the backward pass runs from the loss down to layer a only, so the step
gets cheaper as the window moves up. After the timed steps, one more forward pass counts the decoder layers whose
output requires grad (the layers that enter the backward pass): 30 - a for a window, 30 for LoRA and full fine-tuning.

`--checkpointing on` (or `both`) repeats every configuration with non-reentrant gradient checkpointing turned on the
way Trainer/TRL do it (`activation_checkpointing_enable` plus `enable_input_require_grads`, which on its own would drag
every layer into the backward pass; CoFiTune removes that hook), to show that the truncation still holds.
`--contrast` adds the top window under checkpointing with `fix_input_grads=False`, i.e. without that repair.

Each configuration runs in its own child process (so that each one's peak RSS is its own). Writes the JSON to `--out`
and a plot of step time vs window start next to it (same name, `.png`).

    python benchmarks/bench_depth.py [--steps 5] [--threads 2] [--checkpointing off|on|both] [--contrast]
                                     [--out benchmarks/results/depth.json]

Estimate, not a measurement: the default run (7 configurations, 7 steps each, no checkpointing) takes about 4-5
minutes on 2 idle CPU cores; `--checkpointing both` about twice that. Run it alone: two torch processes on two cores
slow each other down many times.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

from _common import layers_in_backward, long_texts, markdown, rss_mb, run_children, write_json

DEFAULT_WINDOWS = ["0:4", "6:10", "12:16", "18:22", "26:30"]


def batch_of_text(tokenizer, batch: int, length: int):
    """`batch` rows of general prose, each at least `length` tokens long, truncated to exactly `length`."""
    texts = long_texts(tokenizer, length, batch)[:batch]
    ids = tokenizer(texts, truncation=True, max_length=length, return_tensors="pt")["input_ids"]
    assert tuple(ids.shape) == (batch, length), ids.shape
    return ids


def enable_checkpointing(model, trainable) -> None:
    """Non-reentrant gradient checkpointing plus the input-require-grads hook, as Trainer/TRL set them up."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    trainable.enable_input_require_grads()


def child(name: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    import cofitune_peft  # noqa: F401
    from cofitune_peft import CoFiTuneConfig
    from cofitune_peft.kit.loading import load_smollm2

    model, tokenizer = load_smollm2()
    loaded_mb = rss_mb()
    base, _, variant = name.partition("+")
    ckpt = variant in ("ckpt", "ckpt_nofix")
    window = None
    if base == "full_ft":
        trainable = model
    elif base == "lora_r16":
        trainable = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    else:
        _, a, b = base.split("_")
        window = (int(a), int(b))
        config = CoFiTuneConfig(layers=window, fix_input_grads=variant != "ckpt_nofix")
        trainable = get_peft_model(model, config)
    if ckpt:
        enable_checkpointing(model, trainable)
    params = [p for p in trainable.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    x = batch_of_text(tokenizer, args.batch, args.length)
    trainable.train()
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = trainable(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    timed = times[args.warmup :]
    return {
        "name": name,
        "window": list(window) if window else None,
        "checkpointing": ckpt,
        "fix_input_grads": variant != "ckpt_nofix",
        "trainable_params": sum(p.numel() for p in params),
        "step_s_median": statistics.median(timed),
        "step_s_all": times,
        "warmup_steps": args.warmup,
        "layers_in_backward": layers_in_backward(trainable, x),
        "num_layers": model.config.num_hidden_layers,
        "peak_rss_mb": rss_mb(),
        "rss_after_load_mb": loaded_mb,
        "threads": args.threads,
    }


def describe(name: str) -> str:
    base, _, variant = name.partition("+")
    if base == "full_ft":
        text = "full fine-tuning"
    elif base == "lora_r16":
        text = "LoRA r16, all linear"
    else:
        _, a, b = base.split("_")
        text = f"CoFiTune window ({a}, {b})"
    return text + {"": "", "ckpt": " + ckpt", "ckpt_nofix": " + ckpt, fix_input_grads=False"}[variant]


def plot(results: dict, path: str, num_layers: int, title: str) -> None:
    """CoFiTune's step time per window start (blue, each point labelled), the references as grey horizontal lines."""
    from cofitune_peft.kit.plotting import (
        COFITUNE_COLOR,
        family_styles,
        label_points,
        new_figure,
        points_along,
        save_figure,
    )

    variants = {"": "no checkpointing", "ckpt": "checkpointing", "ckpt_nofix": "checkpointing, fix_input_grads=False"}
    curves = {
        v: sorted(
            (r["window"][0], r["step_s_median"])
            for n, r in results.items()
            if r["window"] and n.partition("+")[2] == v
        )
        for v in variants
    }
    curves = {v: points for v, points in curves.items() if points}
    references = [n for n, r in results.items() if not r["window"]]
    styles = family_styles(list(curves), references)
    fig = new_figure(figsize=(8, 5.2))
    ax = fig.add_subplot()
    points, along = [], []  # the labelled points; positions on the curves, kept free of labels
    for variant, curve in curves.items():
        style = {**styles[variant], "marker": "X", "linestyle": "none"} if variant == "ckpt_nofix" else styles[variant]
        ax.plot(*zip(*curve), markersize=7, label=f"CoFiTune window, {variants[variant]}", **style)
        points += curve
        if style["linestyle"] != "none":
            along += points_along(itertools.pairwise(curve))
    for ref in references:
        seconds, style = results[ref]["step_s_median"], styles[ref]
        ax.axhline(seconds, color=style["color"], linestyle=style["linestyle"], linewidth=1.6,
                   label=f"{describe(ref)}: {seconds:.2f} s")  # fmt: skip
    top = max(r["step_s_median"] for r in results.values())
    ax.set_ylim(0, top * 1.12)
    ax.set_xticks(sorted({a for a, _ in points}))
    ax.set_xlabel(f"window start a (window (a, b) trains layers a..b-1; {num_layers} - a layers in the backward pass)")
    ax.set_ylabel("step time, median (s)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    label_points(ax, points, [f"{s:.2f} s" for _, s in points], clear=along, color=COFITUNE_COLOR, fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--windows", nargs="*", default=DEFAULT_WINDOWS, help="CoFiTune windows a:b (layers a..b-1)")
    parser.add_argument("--references", nargs="*", default=["lora_r16", "full_ft"], choices=["lora_r16", "full_ft"])
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="off")
    parser.add_argument(
        "--contrast", action="store_true", help="add the top window under checkpointing with fix_input_grads=False"
    )
    parser.add_argument("--out", default="benchmarks/results/depth.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    windows = []
    for w in args.windows:
        a, b = (int(v) for v in w.split(":"))
        if not 0 <= a < b:
            parser.error(f"bad window {w!r}: need a:b with 0 <= a < b")
        windows.append((a, b))
    bases = [f"window_{a}_{b}" for a, b in windows] + list(args.references)
    variants = {"off": [""], "on": ["ckpt"], "both": ["", "ckpt"]}[args.checkpointing]
    names = [base + ("+" + v if v else "") for v in variants for base in bases]
    if args.contrast and windows:
        a, b = max(windows)
        names.append(f"window_{a}_{b}+ckpt_nofix")

    argv = ["--steps", args.steps, "--warmup", args.warmup, "--threads", args.threads, "--batch", args.batch]
    argv += ["--length", args.length]
    results = run_children(__file__, names, argv, args.threads)

    def ratio(a, ref):
        """`a`'s step time over the reference's with the same checkpointing setting."""
        variant = a.partition("+")[2].replace("_nofix", "")
        key = ref + ("+" + variant if variant else "")
        if key not in results:
            return float("nan")
        return results[a]["step_s_median"] / results[key]["step_s_median"]

    rows = []
    for name, r in results.items():
        rows.append(
            {
                "configuration": describe(name),
                "trainable M": r["trainable_params"] / 1e6,
                "layers in bwd": f"{r['layers_in_backward']}/{r['num_layers']}",
                "step s (median)": r["step_s_median"],
                "step / full": ratio(name, "full_ft"),
                "step / LoRA": ratio(name, "lora_r16"),
                "peak RSS MB": r["peak_rss_mb"],
            }
        )
    table = markdown(rows)
    print(
        f"SmolLM2-135M-Instruct fp32, AdamW, batch {args.batch}x{args.length}, {args.threads} threads, median of "
        f"{args.steps} steps after {args.warmup} warm-up; ratios against the reference with the same checkpointing"
    )
    print(table)
    num_layers = next(iter(results.values()))["num_layers"]
    truncation_holds = all(
        r["layers_in_backward"] == num_layers - r["window"][0]
        for r in results.values()
        if r["window"] and r["fix_input_grads"]
    )
    print(f"every window's backward pass stops at its lowest layer: {truncation_holds}")
    png = os.path.splitext(args.out)[0] + ".png"
    widths = sorted({b - a for a, b in windows})
    title = (
        f"SmolLM2-135M, AdamW, batch {args.batch}x{args.length}, {args.threads} threads: step time vs window depth "
        f"(width {'/'.join(map(str, widths))})"
    )
    data = {"args": vars(args), "results": results, "truncation_holds": truncation_holds, "table": table}
    write_json(args.out, {**data, "plot": os.path.basename(png)})  # also creates the folder for the plot
    plot(results, png, num_layers, title)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
