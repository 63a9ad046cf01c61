"""A real coarse search on SmolLM2-135M-Instruct: which layer window and modules learn arithmetic and forget least?

The same data as `cofitune demo` (cofitune_peft.kit.data, all offline): speciality is two-operand arithmetic ("What is
89 - 16?"), which the base model mostly gets wrong, scored by numeric exact match on held-out questions; versatility
is country-capital probes (short answer and multiple choice) from the CIA World Factbook plus the cross-entropy drift
and KL to the base model on held-out factbook/pydoc prose.

    python examples/search_smollm2.py --output-dir runs/search-smollm2     # ~15 min on 2 CPU cores (defaults)
    cofitune report runs/search-smollm2                                    # table + search.png, also mid-run

The search resumes where it stopped: run the same command again after an interruption.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import cofitune_peft  # noqa: F401  (registers CoFiTune with PEFT)
from cofitune_peft.kit.data import arithmetic_task, capital_probes, extract_number, general_texts
from cofitune_peft.kit.evaluation import SpecialityEval, VersatilityEval
from cofitune_peft.kit.loading import load_smollm2
from cofitune_peft.kit.search import LEVELS, search_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/search-smollm2")
    parser.add_argument("--budget-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4, help="CoFiTune candidates' learning rate (as the demo)")
    parser.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tuning's learning rate (as the demo)")
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--n-probes", type=int, default=20, help="short-answer and multiple-choice probes, each")
    parser.add_argument("--n-general", type=int, default=12)
    parser.add_argument("--levels", default="window,module", help=f"comma-separated, from {','.join(LEVELS)}")
    parser.add_argument("--width", type=int, default=1, help="level-1 windows that level 2 tries other modules in")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)

    _, tok = load_smollm2()
    train, test = arithmetic_task(n_train=2000, n_test=args.n_test)
    probes = [dict(r) for r in capital_probes(args.n_probes, kind="short")]
    probes += [dict(r) for r in capital_probes(args.n_probes, kind="mc")]
    speciality = SpecialityEval.exact_match(
        [dict(r) for r in test], answer_extractor=extract_number, numeric=True, max_new_tokens=24, batch_size=16,
        tokenizer=tok, name="arithmetic",
    )  # fmt: skip
    versatility = VersatilityEval.default(general_texts(n=args.n_general, split="eval")["text"], probes=probes)
    started = time.perf_counter()
    result = search_layers(
        lambda: load_smollm2()[0], [dict(r) for r in train], speciality, versatility, tokenizer=tok,
        budget_steps=args.budget_steps, output_dir=args.output_dir, learning_rate=args.lr,
        full_ft_learning_rate=args.full_lr, levels=[x for x in args.levels.split(",") if x], width=args.width,
        batch_size=args.batch_size, max_length=128,
    )  # fmt: skip
    print(result.to_markdown())
    print("best:", result.best_config.layers, result.best_config.parts)
    print("plot:", result.plot(f"{args.output_dir}/search.png"))
    print(f"wall clock: {(time.perf_counter() - started) / 60:.1f} min (cached candidates are not re-run)")


if __name__ == "__main__":
    main()
