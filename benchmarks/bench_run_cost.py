"""What one run of the comparison costs at one thread: training seconds per step and evaluation seconds, per task.

For each task (the comparison's splits at `--preset full` sizes: `FULL_DEFAULTS`, `FULL_TASK_DEFAULTS`) and each of
full fine-tuning, LoRA r16 and CoFiTune coarse (the registry's builders), it trains `--steps` steps on the task's
data at the preset's batch size (the first step, which allocates the optimizer's state, is timed apart), then
evaluates both splits (`_score_split`, as the comparison does) on the model so trained. A model after a few steps still
answers like the base model, at length, so these evaluation times are an upper bound of a fully trained run's. Prints
a table and writes JSON that `comparison_budget.py --costs` reads:

    OMP_NUM_THREADS=1 python benchmarks/bench_run_cost.py [--tasks arithmetic,knowledge] [--steps 5] [--out PATH]

The load average is recorded: numbers taken while other jobs share the cores are inflated, evenly for training and
evaluation (both are compute-bound on one thread), so their ratios still hold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

METHODS = ("full", "lora", "cofitune")
KIND = {"full": "full", "lora": "lora", "cofitune": "window"}


def measure_task(
    task: str, load, tokenizer, methods=METHODS, steps: int = 5, progress: bool = False, sizes: dict | None = None
) -> dict:
    """`{"full"|"lora"|"window": seconds per step, "first_step": {...}, "eval": s, "eval_test": s, ...}` of a task
    (`sizes` overrides the preset's sizes: `n_eval`, `n_test`, `n_general`, `batch_size`, `max_length`)."""
    from cofitune_peft.kit.compare.command import FULL_DEFAULTS, FULL_TASK_DEFAULTS
    from cofitune_peft.kit.compare.methods import METHODS as REGISTRY
    from cofitune_peft.kit.compare.methods import MethodSettings
    from cofitune_peft.kit.compare.runner import _score_split
    from cofitune_peft.kit.compare.tasks import task_splits
    from cofitune_peft.kit.training import train_sft

    sizes = {**FULL_DEFAULTS, **FULL_TASK_DEFAULTS.get(task, {}), **(sizes or {})}
    train, splits, _ = task_splits(task, tokenizer, n_eval=sizes["n_eval"], n_test=sizes["n_test"],
                                   n_general=sizes["n_general"], importance_samples=1, progress=progress)  # fmt: skip
    out: dict = {"steps_timed": steps, "batch_size": sizes["batch_size"], "first_step": {}}
    for name in methods:
        model = REGISTRY[name].build(load(), MethodSettings(tokenizer=tokenizer))
        stats = train_sft(model, train, tokenizer=tokenizer, steps=steps + 1, learning_rate=1e-4,
                          batch_size=sizes["batch_size"], max_length=sizes["max_length"], progress=progress)  # fmt: skip
        # train_sft reports the whole loop; time the steps after the first by running them again on the same model
        started = time.perf_counter()
        train_sft(model, train, tokenizer=tokenizer, steps=steps, learning_rate=1e-4, batch_size=sizes["batch_size"],
                  max_length=sizes["max_length"], seed=1, progress=progress)  # fmt: skip
        out[KIND[name]] = (time.perf_counter() - started) / steps
        out["first_step"][KIND[name]] = stats["seconds"] - steps * out[KIND[name]]
        if name == "cofitune":
            timings = {}
            for split_name, split in splits.items():
                if hasattr(split.versatility, "prepare"):
                    split.versatility.prepare(load(), tokenizer)
                started = time.perf_counter()
                _score_split(split, model, tokenizer)
                timings[split_name] = time.perf_counter() - started
            out["eval"] = sum(timings.values())
            out["eval_test"] = timings["test"]
        del model
    out["load_average_1min"] = os.getloadavg()[0]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="arithmetic,words,knowledge")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (after one untimed)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "run_cost.json"))
    args = parser.parse_args(argv)
    from cofitune_peft.kit.compare.tasks import model_loader

    torch.set_num_threads(args.threads)
    load, tokenizer = model_loader(args.model)
    results = {"model": args.model, "threads": args.threads, "tasks": {}}
    print("| task | full s/step | LoRA s/step | CoFiTune s/step | eval s (val + test) | eval s (test) | load |")
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        r = measure_task(task, load, tokenizer, steps=args.steps)
        results["tasks"][task] = r
        print(f"| {task} | {r['full']:.2f} | {r['lora']:.2f} | {r['window']:.2f} | {r['eval']:.0f} | "
              f"{r['eval_test']:.0f} | {r['load_average_1min']:.1f} |")  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
