"""Cost of one importance batch relative to one training step (forward + backward) of the full model.

SmolLM2-135M-Instruct (fp32, CPU), batch 4 x 256 tokens of real text (paragraphs of Python's own documentation from
`pydoc_data.topics`). Both are timed in the same process, alternating, so the ratio holds on a shared machine even when
the seconds do not. Target: ratio <= 2.5.

    OMP_NUM_THREADS=2 python benchmarks/bench_importance.py [--rounds 5]

Writes benchmarks/results/importance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from cofitune_peft.estimation import estimate_importance
from cofitune_peft.kit.loading import load_smollm2

BATCH, LENGTH, TARGET = 4, 256, 2.5


def texts(tokenizer, count: int, length: int) -> list[str]:
    """`count` documentation topics of at least `length` tokens each."""
    from pydoc_data.topics import topics

    long_enough = [t for _, t in sorted(topics.items()) if len(tokenizer(t)["input_ids"]) >= length]
    return long_enough[:count]


def importance_batch(model, tokenizer, docs) -> float:
    start = time.perf_counter()
    estimate_importance(
        model, docs, tokenizer=tokenizer, num_samples=BATCH, batch_size=BATCH, max_length=LENGTH, progress=False
    )
    return time.perf_counter() - start


def training_step(model, input_ids, attention_mask) -> float:
    model.train()
    start = time.perf_counter()
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, use_cache=False).loss
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "importance.json"))
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    model.eval()
    docs = texts(tokenizer, BATCH, LENGTH)
    enc = tokenizer(docs, truncation=True, max_length=LENGTH, return_tensors="pt", padding=True)
    assert tuple(enc["input_ids"].shape) == (BATCH, LENGTH)

    importance_batch(model, tokenizer, docs)  # warm-up
    training_step(model, enc["input_ids"], enc["attention_mask"])
    times: dict[str, list[float]] = {"importance batch": [], "training fwd+bwd": []}
    for _ in range(args.rounds):
        times["importance batch"].append(importance_batch(model, tokenizer, docs))
        times["training fwd+bwd"].append(training_step(model, enc["input_ids"], enc["attention_mask"]))

    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["importance batch"] / medians["training fwd+bwd"]
    print(f"SmolLM2-135M fp32, batch {BATCH}x{LENGTH}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"{'step':<20} {'median s':>9} {'min s':>8} {'max s':>8}")
    for name, values in times.items():
        print(f"{name:<20} {medians[name]:>9.3f} {min(values):>8.3f} {max(values):>8.3f}")
    print(f"ratio importance / training: {ratio:.2f} (target <= {TARGET})")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "batch": [BATCH, LENGTH],
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "seconds": times,
        "median_seconds": medians,
        "ratio": round(ratio, 3),
        "target": TARGET,
        "meets_target": ratio <= TARGET,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "note": "shared CPU: compare the ratio, not the seconds",
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
