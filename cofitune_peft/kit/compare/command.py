"""`cofitune compare`: the method comparison from files on disk, or on the kit's offline task presets.

With `--preset arithmetic` or `--preset words` the data are the kit's own: a speciality task (two-operand arithmetic
answered with the bare number, "What is 47 + 38?" -> "85", or word-order reversal, "Reverse the order of these words:
apple river stone" -> "stone river apple"; training, validation and test questions drawn without overlap),
country-capital probes split by country (generated short answers and multiple choice), and general prose split by
document (validation, test), with the `importance` split of `general_texts` for importance and CorDA. `--preset full`
is the committed comparison: both tasks, one after the other (each in `OUTPUT_DIR/<task>`; `--task` runs one), every
method, the grids of `FULL_GRIDS`, and extra seeds for the headline methods' selected points, at the sizes of
`FULL_DEFAULTS` (each can be overridden on the command line). Otherwise every split is a file.
"""

from __future__ import annotations

import argparse
import logging
import os

from cofitune_peft import CoFiTuneError

from .._cli_common import read_jsonl, read_text_chunks
from ..loading import BASE_MODEL_ID_HELP
from .methods import DEFAULT_LEARNING_RATES, METHODS, MethodSettings, resolve_methods
from .runner import DEFAULT_METHODS, EvalSplit, compare_methods
from .tasks import TASKS, model_loader, task_splits

#: `--preset full`: the sizes of the committed comparison (docs/results.md), where a flag does not set them: 40 steps of
#: batch 8 (the grids' top learning rates forget: full fine-tuning's generated probes fall), eval splits of 40
#: questions, 40 + 40 probes and 12 general texts each, sized so that both tasks fit a few hours on 2 CPU cores.
FULL_DEFAULTS = {
    "steps": 40,
    "batch_size": 8,
    "max_length": 128,
    "n_eval": 40,
    "n_general": 12,
    "seeds": "1,2",
    "seed_methods": "full,lora,cofitune,cofitune_mask,cofitune_mask_mean1,cofitune_alpha,wiseft",
}

#: `--preset full`: learning-rate grids (log-spaced, x3) shifted one step up from the registry's defaults, which were
#: sized for 150 steps; the post-hoc grids of the derived methods (WiSE-FT, CoFiTune's strength) cut to two values.
FULL_GRIDS = {
    **dict.fromkeys(("full", "l1", "l2", "osf", "vsoftmask"), (3e-05, 0.0001, 0.0003)),
    **dict.fromkeys(("lora", "corda_kpm", "cofitune_gradient"), (3e-4, 1e-3, 3e-3)),
    # CoFiTune's coarse window collapses on arithmetic at 1e-3 after 40 steps: its grid reaches one step lower.
    "cofitune": (1e-4, 3e-4, 1e-3, 3e-3),
    "cofitune_mask": (2e-4, 6e-4, 2e-3, 6e-3),
    # The mask variants span the rates where the mask and the coarse window did best on either task (6e-3 forgot).
    **dict.fromkeys(("cofitune_onesided", "cofitune_fisher"), (2e-4, 6e-4, 2e-3)),
    **dict.fromkeys(("cofitune_mask_mean1", "cofitune_hard"), (1e-4, 3e-4, 1e-3)),
    "wiseft": (0.3, 0.6),
    "cofitune_alpha": (0.3, 0.6),
}

#: `--preset full`: every method, in the order they run (the headline ones first, so an interrupted run has them).
FULL_METHODS = (
    "base", "full", "wiseft", "lora", "cofitune", "cofitune_alpha", "cofitune_mask", "cofitune_mask_mean1",
    "cofitune_onesided", "cofitune_fisher", "cofitune_hard", "cofitune_gradient", "vsoftmask", "l1",
    "l2", "corda_kpm", "osf",
)  # fmt: skip

#: Defaults of the options `--preset full` sets otherwise.
PLAIN_DEFAULTS = {"batch_size": 8, "max_length": 256, "n_eval": 100, "n_general": 24, "seeds": "", "seed_methods": ""}


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
    parser.add_argument("--base-model-id", help=BASE_MODEL_ID_HELP)
    parser.add_argument(
        "--save-adapters",
        help="comma-separated PEFT methods whose trained runs save their adapter (OUTPUT_DIR/adapters)",
    )
    parser.add_argument(
        "--preset", choices=(*TASKS, "full"), help="the kit's offline data instead of files ('full': both tasks)"
    )
    parser.add_argument("--task", choices=TASKS, help="with `--preset full`: run this task only")
    parser.add_argument("--train", help="training JSONL: prompt/completion, messages or text")
    for split in ("val", "test"):
        parser.add_argument(f"--{split}-eval", help=f"{split} speciality JSONL: prompt/answer (or options)")
        parser.add_argument(f"--{split}-general", help=f"{split} general text file (CE drift and KL)")
        parser.add_argument(f"--{split}-probes", help=f"{split} versatility probes JSONL")
    parser.add_argument("--general", help="general text for importance and CorDA (disjoint from the eval texts)")
    parser.add_argument("--steps", type=int, help="optimizer steps of every run (required but with `--preset full`)")
    parser.add_argument("--output-dir", required=True, help="results directory (re-run to resume)")
    parser.add_argument(
        "--methods",
        help=f"comma-separated of {sorted(METHODS)} (default: {','.join(DEFAULT_METHODS)}; `--preset "
        "full`: FULL_METHODS)",
    )
    parser.add_argument("--lr", action="append", metavar="METHOD=V1,V2,V3", help=f"a grid (defaults: {defaults})")
    parser.add_argument("--seeds", help="extra seeds for the selected points, e.g. '1,2'")
    parser.add_argument("--seed-methods", help="the methods whose selected points get `--seeds` (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="default 8")
    parser.add_argument("--max-length", type=int, help="default 256 (`--preset full`: 128)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation length of exact-match evals")
    parser.add_argument("--n-eval", type=int, help="preset: questions (and probes) per eval split (default 100)")
    parser.add_argument("--n-general", type=int, help="preset: general texts per eval split (default 24)")
    parser.add_argument("--layers", help="CoFiTune window 'a:b' (0-based, b exclusive); default (N//4, N//2)")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of LoRA and CorDA")
    parser.add_argument("--l1", type=float, default=1e-5, help="strength of the L1-to-base penalty")
    parser.add_argument("--l2", type=float, default=1.0, help="strength of the L2-to-base penalty")
    parser.add_argument("--importance-samples", type=int, default=64, help="general texts for importance")
    parser.add_argument("--weight", type=float, default=0.5, help="weight of Spec. in Uni.")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the cached runs")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def _preset(task: str, args, tokenizer):
    return task_splits(
        task,
        tokenizer,
        n_train=max(2000, args.steps * args.batch_size),
        n_eval=args.n_eval,
        n_general=args.n_general,
        importance_samples=args.importance_samples,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )


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


def _with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset: `FULL_DEFAULTS` (and `FULL_GRIDS`, `FULL_METHODS`) with `--preset full`, else the
    plain defaults."""
    full = args.preset == "full"
    if args.task and not full:
        raise CoFiTuneError(f"`--task` selects a task of `--preset full`; got `--task {args.task}` without it.")
    defaults = FULL_DEFAULTS if full else PLAIN_DEFAULTS
    values = vars(args)
    preset_seed_methods = values.get("seed_methods") is None
    for key in ("steps", *PLAIN_DEFAULTS):
        if values.get(key) is None:
            values[key] = defaults.get(key)
    if args.steps is None:
        raise CoFiTuneError("`--steps` is required (optimizer steps of every run), but with `--preset full`.")
    if args.methods is None:
        args.methods = ",".join(FULL_METHODS if full else DEFAULT_METHODS)
    compared = resolve_methods(_names(args.methods))  # with base, full and the parents of derived methods
    grids = {k: v for k, v in FULL_GRIDS.items() if k in compared} if full else {}
    grids.update(parse_grids(args.lr))
    args.grids = grids
    if preset_seed_methods:  # the preset's headline methods that this run compares
        args.seed_methods = ",".join(m for m in _names(args.seed_methods) if m in compared)
    return args


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CoFiTuneError(f"`{option}` takes comma-separated ints, got {text!r}.") from None


def _names(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def compare_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = _with_defaults(args)
    layers = None
    if args.layers:
        try:
            layers = tuple(int(x) for x in args.layers.split(":"))
        except ValueError:
            raise CoFiTuneError(f"`--layers` takes 'a:b' (0-based, b exclusive), got {args.layers!r}.") from None
    seeds = _ints(args.seeds, "--seeds")
    compared = resolve_methods(_names(args.methods))
    unsaved = [m for m in _names(args.save_adapters or "") if m not in compared or not compared[m].trains]
    if unsaved:
        trained = sorted(m for m, method in compared.items() if method.trains)
        raise CoFiTuneError(f"`--save-adapters`: {unsaved} are not trained in this run; it trains {trained}.")
    loader, tokenizer = model_loader(args.model, base_model_id=args.base_model_id)
    if args.preset == "full":
        jobs = [(task, os.path.join(args.output_dir, task)) for task in ((args.task,) if args.task else TASKS)]
    else:
        jobs = [(args.preset, args.output_dir)]
    for task, output_dir in jobs:
        if task:
            train, splits, general = _preset(task, args, tokenizer)
        else:
            train, splits, general = _from_files(args, tokenizer)
        settings = MethodSettings(
            general_texts=general,
            layers=layers,
            lora_rank=args.lora_rank,
            penalty_strengths={"l1": args.l1, "l2": args.l2},
        )
        result = compare_methods(
            loader,
            train,
            tokenizer=tokenizer,
            validation=splits["validation"],
            test=splits["test"],
            steps=args.steps,
            output_dir=output_dir,
            methods=_names(args.methods),
            learning_rates=args.grids,
            settings=settings,
            batch_size=args.batch_size,
            max_length=args.max_length,
            seed=args.seed,
            seeds=seeds,
            seed_methods=_names(args.seed_methods) or None,
            importance_kwargs={"num_samples": args.importance_samples},
            weight=args.weight,
            report_only=args.report_only,
            save_adapters=_names(args.save_adapters or ""),
            progress=not args.no_progress,
        )
        if task:
            print(f"\n## {task}\n")
        print(result.to_markdown())
        print(f"\nwritten: {os.path.join(output_dir, 'comparison.{json,md,png}')}")
    return 0
