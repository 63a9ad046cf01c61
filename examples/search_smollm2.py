"""A real coarse search on SmolLM2-135M-Instruct: which layer window and modules learn arithmetic and forget least?

Speciality: two-operand arithmetic ("What is 47 + 38?" -> "85"), which the base model mostly gets wrong; scored by
greedy exact match on held-out questions. Versatility: cross-entropy drift and KL to the base model on prose from
CPython's `pydoc_data.topics`, plus country-capital questions the base model partly knows. Everything is generated
offline.

    OMP_NUM_THREADS=1 python examples/search_smollm2.py --estimate            # time it, do not run it
    OMP_NUM_THREADS=1 python examples/search_smollm2.py --output-dir runs/search-smollm2
    cofitune report runs/search-smollm2                                       # table + search.png, also mid-run

The search resumes where it stopped: run the same command again after an interruption.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import time

import torch

import cofitune_peft  # noqa: F401  (registers CoFiTune with PEFT)
from cofitune_peft.evaluation import SpecialityEval, VersatilityEval
from cofitune_peft.models import load_smollm2
from cofitune_peft.search import LEVELS, paper_windows, refine_windows, search_layers
from cofitune_peft.training import train_sft

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Egypt", "Cairo"), ("Russia", "Moscow"), ("Canada", "Ottawa"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Norway", "Oslo"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Thailand", "Bangkok"),
]  # fmt: skip


def arithmetic(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train / eval sets of "What is a + b?" and "What is a - b?" (a >= b) with 2-digit operands."""
    rng = random.Random(seed)
    pool = sorted({(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in "+-" if op == "+" or a >= b})
    rng.shuffle(pool)

    def item(a, op, b):
        return {"prompt": f"What is {a} {op} {b}?", "completion": str(a + b if op == "+" else a - b)}

    train = [item(*q) for q in pool[:n_train]]
    evals = [{"prompt": x["prompt"], "answer": x["completion"]} for x in (item(*q) for q in pool[-n_eval:])]
    return train, evals


def pydoc_prose(n: int, chars: int = 800) -> list[str]:
    """`n` chunks of ~`chars` characters of prose (no code, no headings) from the Python language reference."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.splitlines()
            if (
                not lines
                or lines[0].startswith((" ", "\t"))
                or (len(lines) > 1 and set(lines[1].strip()) <= set("*=-"))
            ):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text) > 200 and "::" not in text:
                paragraphs.append(text)
    random.Random(0).shuffle(paragraphs)
    chunks, current = [], ""
    for p in paragraphs:
        current = f"{current} {p}".strip()
        if len(current) >= chars:
            chunks.append(current[: 2 * chars])
            current = ""
        if len(chunks) == n:
            break
    return chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/search-smollm2")
    parser.add_argument("--budget-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4, help="CoFiTune candidates' learning rate")
    parser.add_argument("--full-lr", type=float, default=3e-5, help="full fine-tuning's learning rate")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=40)
    parser.add_argument("--n-general", type=int, default=12)
    parser.add_argument("--levels", default=",".join(LEVELS))
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--estimate", action="store_true", help="time each part once and print the projected cost")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    _, tok = load_smollm2()
    train, evals = arithmetic(args.n_train, args.n_eval)
    probes = [{"prompt": f"What is the capital of {c}?", "answer": a} for c, a in CAPITALS]
    speciality = SpecialityEval.exact_match(evals, tokenizer=tok, max_new_tokens=8, batch_size=20)
    versatility = VersatilityEval.default(pydoc_prose(args.n_general), probes, tokenizer=tok, max_new_tokens=12)
    levels = [x for x in args.levels.split(",") if x]

    if args.estimate:
        estimate(args, tok, train, speciality, versatility, levels)
        return
    result = search_layers(
        lambda: load_smollm2()[0], train, speciality, versatility, tokenizer=tok, budget_steps=args.budget_steps,
        output_dir=args.output_dir, learning_rate=args.lr, full_ft_learning_rate=args.full_lr, levels=levels,
        width=args.width, batch_size=args.batch_size, max_length=64,
    )  # fmt: skip
    print(result.to_markdown())
    print("best:", result.best_config.layers, result.best_config.target_modules)
    print("plot:", result.plot(f"{args.output_dir}/search.png"))


def estimate(args, tok, train, speciality, versatility, levels) -> None:
    """Time one evaluation, and a few optimizer steps of full fine-tuning and of a CoFiTune window; project."""
    from peft import get_peft_model

    from cofitune_peft import CoFiTuneConfig

    steps = 3
    base = load_smollm2()[0]
    t = time.perf_counter()
    versatility.prepare(base, tok)
    t_prepare = time.perf_counter() - t
    t = time.perf_counter()
    s, v = speciality(base, tok), versatility(base, tok)
    t_eval = time.perf_counter() - t
    print(f"base model: speciality {s:.3f}, versatility {v:.3f}")
    t_full = train_sft(base, train, tokenizer=tok, steps=steps, learning_rate=args.full_lr,
                       batch_size=args.batch_size, max_length=64, progress=False)["seconds"] / steps  # fmt: skip
    per_window = {}
    for window in [(0, 7), (7, 15), (15, 30)]:
        for modules in ("ffn", "ffn+mha"):
            model = get_peft_model(load_smollm2()[0], CoFiTuneConfig(layers=window, target_modules=modules))
            stats = train_sft(model, train, tokenizer=tok, steps=steps, learning_rate=args.lr,
                              batch_size=args.batch_size, max_length=64, progress=False)  # fmt: skip
            per_window[(window, modules)] = stats["seconds"] / steps
    t_cofi = sum(per_window.values()) / len(per_window)
    n = 30
    count = len(paper_windows(n))
    count += 2 * args.width if "module" in levels else 0
    count += len(refine_windows((7, 15), n)) if "refine" in levels else 0
    total = t_prepare + (count + 2) * t_eval + args.budget_steps * (t_full + count * t_cofi)
    print(f"evaluation of one model: {t_eval:.0f} s (base reference: {t_prepare:.0f} s)")
    print(f"one step: full fine-tuning {t_full:.1f} s; CoFiTune {t_cofi:.1f} s on average")
    for (window, modules), seconds in per_window.items():
        print(f"  {window} {modules}: {seconds:.1f} s/step")
    print(f"search: base + full + ~{count} candidates x {args.budget_steps} steps = ~{total / 60:.0f} min")


if __name__ == "__main__":
    main()
