"""`cofitune compare`: the method comparison from files on disk, or on the kit's offline arithmetic preset.

With `--preset arithmetic` the data are the kit's own: two-operand arithmetic (training, validation and test questions
drawn without overlap), country-capital probes split by country, and general prose split by document (validation,
test) with the `importance` split of `general_texts` for importance and CorDA. Otherwise every split is a file.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from cofitune_peft import CoFiTuneError

from .._cli_common import read_jsonl, read_text_chunks
from .methods import DEFAULT_LEARNING_RATES, METHODS, MethodSettings
from .runner import DEFAULT_METHODS, EvalSplit, compare_methods


def parse_grids(values: list[str] | None) -> dict[str, list[float]]:
    """`["lora=1e-4,3e-4,1e-3", ...]` -> `{"lora": [1e-4, 3e-4, 1e-3]}`."""
    grids = {}
    for item in values or []:
        name, _, numbers = item.partition("=")
        try:
            grids[name.strip()] = [float(x) for x in numbers.split(",") if x.strip()]
        except ValueError:
            raise CoFiTuneError(f"`--lr` takes METHOD=v1,v2,v3, got {item!r}.") from None
        if not numbers:
            raise CoFiTuneError(f"`--lr` takes METHOD=v1,v2,v3, got {item!r}.")
    return grids


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = "; ".join(f"{m}: {','.join(f'{v:g}' for v in lrs)}" for m, lrs in DEFAULT_LEARNING_RATES.items() if lrs)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (the embedded SmolLM2-135M-Instruct) or a path")
    parser.add_argument("--preset", choices=("arithmetic",), help="the kit's offline data instead of files")
    parser.add_argument("--train", help="training JSONL: prompt/completion, messages or text")
    for split in ("val", "test"):
        parser.add_argument(f"--{split}-eval", help=f"{split} speciality JSONL: prompt/answer (or options)")
        parser.add_argument(f"--{split}-general", help=f"{split} general text file (CE drift and KL)")
        parser.add_argument(f"--{split}-probes", help=f"{split} versatility probes JSONL")
    parser.add_argument("--general", help="general text for importance and CorDA (disjoint from the eval texts)")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps of every run")
    parser.add_argument("--output-dir", required=True, help="results directory (re-run to resume)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated of {sorted(METHODS)}")
    parser.add_argument("--lr", action="append", metavar="METHOD=V1,V2,V3", help=f"a grid (defaults: {defaults})")
    parser.add_argument("--seeds", default="", help="extra seeds for the selected points, e.g. '1,2'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation length of exact-match evals")
    parser.add_argument("--n-eval", type=int, default=100, help="preset: questions (and probes) per eval split")
    parser.add_argument("--n-general", type=int, default=24, help="preset: general texts per eval split")
    parser.add_argument("--layers", help="CoFiTune window 'a:b' (0-based, b exclusive); default (N//4, N//2)")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of LoRA and CorDA")
    parser.add_argument("--l1", type=float, default=1e-5, help="strength of the L1-to-base penalty")
    parser.add_argument("--l2", type=float, default=1.0, help="strength of the L2-to-base penalty")
    parser.add_argument("--importance-samples", type=int, default=64, help="general texts for importance")
    parser.add_argument("--weight", type=float, default=0.5, help="weight of Spec. in Uni.")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def _load(name: str):
    if name in ("smollm2", "smollm2-135m-instruct"):
        from ..loading import load_smollm2

        return load_smollm2, load_smollm2()[1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(name):
        raise CoFiTuneError(f"`--model` must be 'smollm2' or a local model directory, got {name!r}.")
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (lambda: AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)), tokenizer


def _preset_arithmetic(args, tokenizer):
    from ..data import arithmetic_task, capital_probes, general_texts
    from ..evaluation import SpecialityEval, VersatilityEval, extract_number

    n = args.n_eval
    train, held_out = arithmetic_task(n_train=max(2000, args.steps * args.batch_size), n_test=2 * n)
    held_out = [dict(x) for x in held_out]
    n_probes = min(n, 84)  # the factbook has ~169 countries with one clean capital: half per split at most
    short = [dict(x) for x in capital_probes(2 * n_probes, kind="short")]
    mc = [dict(x) for x in capital_probes(2 * n_probes, kind="mc")]
    val_countries = {x["country"] for x in short[:n_probes]}
    docs = general_texts(n=None, split="eval")
    documents = sorted(set(docs["document"]))
    val_docs = set(documents[::2])
    progress = not args.no_progress
    splits = {}
    for name, questions, in_val in (("validation", held_out[:n], True), ("test", held_out[n:], False)):
        probes = [p for p in short + mc if (p["country"] in val_countries) == in_val]
        texts = [t for t, d in zip(docs["text"], docs["document"]) if (d in val_docs) == in_val][: args.n_general]
        spec = SpecialityEval.exact_match(
            questions, answer_extractor=extract_number, numeric=True, max_new_tokens=args.max_new_tokens,
            tokenizer=tokenizer, progress=progress, name=f"{name} speciality",
        )  # fmt: skip
        vers = VersatilityEval.default(
            texts, probes, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, progress=progress
        )
        splits[name] = EvalSplit(spec, vers)
    general = list(general_texts(n=args.importance_samples, split="importance")["text"])
    return [dict(x) for x in train], splits, general


def _from_files(args, tokenizer):
    from ..evaluation import VersatilityEval
    from ..evaluation.speciality import speciality_for_examples

    missing = [f"--{o}" for o in ("train", "val-eval", "test-eval") if not getattr(args, o.replace("-", "_"))]
    if missing:
        raise CoFiTuneError(f"without `--preset`, pass {missing} (JSONL files).")
    progress = not args.no_progress
    splits = {}
    for name, prefix in (("validation", "val"), ("test", "test")):
        items = read_jsonl(getattr(args, f"{prefix}_eval"))
        spec = speciality_for_examples(
            items, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, progress=progress
        )
        general_path, probes_path = getattr(args, f"{prefix}_general"), getattr(args, f"{prefix}_probes")
        if not general_path and not probes_path:
            raise CoFiTuneError(f"pass `--{prefix}-general` and/or `--{prefix}-probes` for the {name} versatility.")
        vers = VersatilityEval.default(
            read_text_chunks(general_path) if general_path else None,
            read_jsonl(probes_path) if probes_path else None,
            tokenizer=tokenizer,
            max_new_tokens=args.max_new_tokens,
            progress=progress,
        )
        splits[name] = EvalSplit(spec, vers)
    general = read_text_chunks(args.general) if args.general else []
    return read_jsonl(args.train), splits, general


def compare_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    loader, tokenizer = _load(args.model)
    train, splits, general = (_preset_arithmetic if args.preset else _from_files)(args, tokenizer)
    layers = None
    if args.layers:
        try:
            layers = tuple(int(x) for x in args.layers.split(":"))
        except ValueError:
            raise CoFiTuneError(f"`--layers` takes 'a:b' (0-based, b exclusive), got {args.layers!r}.") from None
    settings = MethodSettings(
        general_texts=general,
        layers=layers,
        lora_rank=args.lora_rank,
        penalty_strengths={"l1": args.l1, "l2": args.l2},
    )
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise CoFiTuneError(f"`--seeds` takes comma-separated ints, got {args.seeds!r}.") from None
    result = compare_methods(
        loader,
        train,
        tokenizer=tokenizer,
        validation=splits["validation"],
        test=splits["test"],
        steps=args.steps,
        output_dir=args.output_dir,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        learning_rates=parse_grids(args.lr),
        settings=settings,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        seeds=seeds,
        importance_kwargs={"num_samples": args.importance_samples},
        weight=args.weight,
        progress=not args.no_progress,
    )
    print(result.to_markdown())
    print(f"\nwritten: {os.path.join(args.output_dir, 'comparison.{json,md,png}')}")
    return 0
