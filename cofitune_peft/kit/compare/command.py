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
import functools
import logging
import math
import os

from cofitune_peft import CoFiTuneError

from .._cli_common import read_jsonl, read_text_chunks
from ..loading import BASE_MODEL_ID_HELP
from .methods import DEFAULT_LEARNING_RATES, METHODS, MethodSettings, resolve_methods
from .runner import DEFAULT_METHODS, EvalSplit, compare_methods
from .tasks import TASKS, model_loader, task_replay, task_splits

#: `--preset full`: the sizes of the committed comparison (docs/results.md), where a flag does not set them: 40 steps of
#: batch 8 (the grids' top learning rates forget: full fine-tuning's generated probes fall); validation splits of 80
#: questions, 80 + 80 probes and 16 general texts, test splits of 120, 120 + 120 and 16; extra seeds 1 and 2 for the
#: headline methods and those near the best on validation (`--seed-methods auto`). Sized so that the three tasks and
#: the Gemma headline fit about 8 process-hours at one thread (docs/results.md, "The next comparison").
FULL_DEFAULTS = {
    "steps": 40,
    "batch_size": 8,
    "max_length": 128,
    "n_eval": 80,
    "n_test": 120,
    "n_general": 16,
    "seeds": "1,2",
    "seed_methods": "auto",
}

#: `--preset full`: learning-rate grids, two points each around where the previous comparison and the knowledge
#: calibration selected (docs/results.md). Replay methods have none: they train at their parent's selected rate
#: (`FULL_RATE_FROM`).
FULL_GRIDS = {
    "full": (3e-05, 1e-4),
    **dict.fromkeys(("l1", "l2", "osf", "vsoftmask", "cofitune_l2out"), (3e-05, 0.0001, 0.0003)),
    "lora": (1e-3, 3e-3),
    **dict.fromkeys(("corda_kpm", "cofitune_gradient"), (3e-4, 1e-3, 3e-3)),
    "cofitune": (3e-4, 1e-3),
    "cofitune_mask": (6e-4, 2e-3),
    **dict.fromkeys(("cofitune_onesided", "cofitune_fisher"), (2e-4, 6e-4, 2e-3)),
    **dict.fromkeys(("cofitune_mask_mean1", "cofitune_hard"), (1e-4, 3e-4, 1e-3)),
    **dict.fromkeys(("cofitune_pull", "cofitune_restrained"), (3e-4, 1e-3)),
    "wiseft": (0.3, 0.6),
    "cofitune_alpha": (0.3, 0.6),
}

#: `--preset full`: the methods of the committed run, in the order they run (the headline first, so an interrupted run
#: has them): full fine-tuning, LoRA, CoFiTune coarse and its default mask, the fine levels that are not a learning
#: rate (with `l2`, the control of `cofitune_l2out`: the same pull toward the base with no window left free), and
#: replay. The rest of the registry is cut for the budget (docs/results.md lists it, with the command that adds it:
#: `--methods` with their names resumes the same folders).
FULL_METHODS = (
    "base", "full", "lora", "cofitune", "cofitune_mask", "cofitune_pull", "cofitune_restrained", "cofitune_l2out",
    "l2", "full_replay10", "full_replay25", "lora_replay10", "lora_replay25", "cofitune_replay10", "cofitune_replay25",
)  # fmt: skip

#: `--seed-methods auto`: these methods always get the extra seeds; then every method whose selected validation Uni. is
#: within `AUTO_SEEDS_MARGIN` of the best one's, at most `AUTO_SEEDS_MAX` methods in all (`auto_seed_methods`).
AUTO_SEEDS_ALWAYS = ("full", "lora", "cofitune")
AUTO_SEEDS_MARGIN = 0.05
AUTO_SEEDS_MAX = 4

#: `--preset full`: methods that train at the learning rate their parent's sweep selects on validation, one point each
#: (replay: the practitioner's recipe, with general data mixed in), unless `--lr` gives them a grid. They run after
#: the sweep of the others, in the same call.
FULL_RATE_FROM = {f"{parent}_replay{share}": parent for parent in ("full", "lora", "cofitune") for share in (10, 25)}

#: Defaults of the options `--preset full` sets otherwise.
PLAIN_DEFAULTS = {
    "batch_size": 8, "max_length": 256, "n_eval": 100, "n_test": None, "n_general": 24, "seeds": "", "seed_methods": "",
}  # fmt: skip

#: `--preset full`: per-task sizes that differ from `FULL_DEFAULTS` (where no flag sets them).
FULL_TASK_DEFAULTS: dict[str, dict] = {"knowledge": {"batch_size": 16}}

#: `--preset full`: per-task grids that replace `FULL_GRIDS` (where no `--lr` sets them). The knowledge task is new: its
#: headline grids have three points (full fine-tuning's top rate is where the calibration learned the most).
FULL_TASK_GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "knowledge": {"full": (3e-5, 1e-4, 3e-4), "lora": (3e-4, 1e-3, 3e-3), "cofitune": (3e-4, 1e-3, 3e-3)},
}


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
    parser.add_argument(
        "--seed-methods",
        help="the methods whose selected points get `--seeds` (default: all; 'auto': the headline methods and those "
        "within AUTO_SEEDS_MARGIN of the best validation Uni.)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="default 8")
    parser.add_argument("--max-length", type=int, help="default 256 (`--preset full`: 128)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation length of exact-match evals")
    parser.add_argument("--n-eval", type=int, help="preset: validation questions (and probes of each kind)")
    parser.add_argument(
        "--n-test", type=int, help="preset: test questions (and probes of each kind); default --n-eval"
    )
    parser.add_argument("--n-general", type=int, help="preset: general texts per eval split (default 24)")
    parser.add_argument("--layers", help="CoFiTune window 'a:b' (0-based, b exclusive); default (N//4, N//2)")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of LoRA and CorDA")
    parser.add_argument("--l1", type=float, default=1e-5, help="strength of the L1-to-base penalty")
    parser.add_argument("--l2", type=float, default=1.0, help="strength of the L2-to-base penalty")
    parser.add_argument("--importance-samples", type=int, default=64, help="general texts for importance")
    parser.add_argument("--pull-strength", type=float, default=300.0, help="decay of cofitune_pull per unit lr and I")
    parser.add_argument(
        "--restraint-rate", type=float, default=0.2, help="cofitune_restrained's rate outside the window"
    )
    parser.add_argument("--replay-examples", type=int, default=128, help="general instructions the replay pool asks")
    parser.add_argument("--weight", type=float, default=0.5, help="weight of Spec. in Uni.")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the cached runs")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def _preset(task: str, args, tokenizer):
    return task_splits(
        task,
        tokenizer,
        n_train=max(2000, args.steps * args.batch_size),
        n_eval=args.n_eval,
        n_test=args.n_test,
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
    args.given = {k for k in ("steps", *PLAIN_DEFAULTS) if values.get(k) is not None}
    preset_seed_methods = values.get("seed_methods") is None
    for key in ("steps", *PLAIN_DEFAULTS):
        if values.get(key) is None:
            values[key] = defaults.get(key)
    if args.steps is None:
        raise CoFiTuneError("`--steps` is required (optimizer steps of every run), but with `--preset full`.")
    if args.methods is None:
        args.methods = ",".join(FULL_METHODS if full else DEFAULT_METHODS)
    names = _names(args.methods)
    if full:  # a replay method trains at its parent's selected rate: the parent is swept too, on the preset's grid
        names = [*names, *(FULL_RATE_FROM[m] for m in names if m in FULL_RATE_FROM)]
    compared = resolve_methods(names)  # with base, full and the parents of derived methods
    grids = {k: v for k, v in FULL_GRIDS.items() if k in compared} if full else {}
    grids.update(parse_grids(args.lr))
    args.grids = grids
    if preset_seed_methods and not args.seed_methods.startswith("auto"):  # the preset's methods this run compares
        args.seed_methods = ",".join(m for m in _names(args.seed_methods) if m in compared)
    return args


def _grids_of(methods: list[str], grids: dict[str, list[float]]) -> dict[str, list[float]]:
    """The grids in `grids` of the methods a `compare_methods(methods=...)` call compares (with base, full and the
    parents of derived methods): a grid set for a method swept only as a replay method's parent stays out of a call
    that does not compare it."""
    compared = resolve_methods(methods)
    return {k: v for k, v in grids.items() if k in compared}


def _task_defaults(task: str, args: argparse.Namespace) -> argparse.Namespace:
    """`args` for one task of `--preset full`: `FULL_TASK_DEFAULTS[task]` where no flag set the value."""
    if args.preset != "full":
        return args
    out = argparse.Namespace(**vars(args))
    for key, value in FULL_TASK_DEFAULTS.get(task, {}).items():
        if key not in getattr(args, "given", set()):
            setattr(out, key, value)
    given = parse_grids(getattr(args, "lr", None))
    task_grids = {m: v for m, v in FULL_TASK_GRIDS.get(task, {}).items() if m in getattr(args, "grids", {})}
    out.grids = {**getattr(args, "grids", {}), **{m: v for m, v in task_grids.items() if m not in given}}
    return out


def auto_seed_methods(
    result, always: tuple[str, ...] = AUTO_SEEDS_ALWAYS, margin: float = AUTO_SEEDS_MARGIN, limit: int = AUTO_SEEDS_MAX
) -> list[str]:
    """The methods whose selected points get the extra seeds under `--seed-methods auto`: `always` (those compared),
    then every other method whose selected validation Uni. is within `margin` of the best one's, best first, at most
    `limit` in all (item 6 of issue 20: seeds where a method may be as good as the best; the margin stands in for a
    seed spread that is not measured yet, and reads validation scores only)."""
    rows = {m: r for m, r in result.selected.items() if m != "base" and math.isfinite(r["validation"]["uni"])}
    if not rows:
        return []
    best = max(r["validation"]["uni"] for r in rows.values())
    close = sorted((m for m, r in rows.items() if best - r["validation"]["uni"] <= margin),
                   key=lambda m: -rows[m]["validation"]["uni"])  # fmt: skip
    return list(dict.fromkeys([*(m for m in always if m in rows), *close]))[:limit]


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
    base_args = args
    for task, output_dir in jobs:
        args = _task_defaults(task, base_args) if task else base_args
        if task:
            train, splits, general = _preset(task, args, tokenizer)
        else:
            train, splits, general = _from_files(args, tokenizer)
        replay_file = os.path.join(output_dir, "replay.json")
        wants_replay = any(METHODS[m].train_data is not None for m in _names(args.methods) if m in METHODS)
        if task or wants_replay or os.path.isfile(replay_file):
            # a preset's replay pool is part of its task data (built once, cached in replay.json), so that every
            # subset of methods has the same settings and resumes the same folder
            os.makedirs(output_dir, exist_ok=True)
            replay = task_replay(loader, tokenizer, splits, replay_file,
                                 n=args.replay_examples, progress=not args.no_progress)  # fmt: skip
        else:
            replay = ()
        settings = MethodSettings(
            general_texts=general,
            layers=layers,
            lora_rank=args.lora_rank,
            penalty_strengths={"l1": args.l1, "l2": args.l2},
            replay_examples=replay,
            pull_strength=args.pull_strength,
            restraint_rate=args.restraint_rate,
        )
        run = functools.partial(
            compare_methods, loader, train, tokenizer=tokenizer, validation=splits["validation"], test=splits["test"],
            steps=args.steps, output_dir=output_dir, settings=settings, batch_size=args.batch_size,
            max_length=args.max_length, seed=args.seed, importance_kwargs={"num_samples": args.importance_samples},
            weight=args.weight, progress=not args.no_progress,
        )  # fmt: skip
        methods, grids = _names(args.methods), dict(args.grids)
        rate_from = FULL_RATE_FROM if args.preset == "full" else {}
        pending = [m for m in methods if m in rate_from and m not in grids]
        if pending:
            # the sweep of the others first (it resumes from the cache; with --report-only it trains nothing); then
            # each of these at its parent's rate (where the parent has no finished run, over the parent's grid, so
            # that a report shows what is cached)
            first = list(dict.fromkeys([*(m for m in methods if m not in pending), *(rate_from[m] for m in pending)]))
            first_grids = _grids_of(first, grids)
            swept = run(methods=first, learning_rates=first_grids, report_only=args.report_only)
            for m in pending:
                parent = swept.selected.get(rate_from[m])
                fallback = first_grids.get(rate_from[m]) or METHODS[rate_from[m]].learning_rates
                grids[m] = [parent["learning_rate"]] if parent else list(fallback)
        auto = args.seed_methods.startswith("auto")
        seeds = _ints(args.seeds, "--seeds")
        seed_methods = _names(args.seed_methods) or None
        if auto and seeds and not args.report_only:
            # the sweep first (resumes from the cache), then the seeds of the methods it puts near the best
            seed_methods = auto_seed_methods(run(methods=methods, learning_rates=_grids_of(methods, grids)))
            logging.getLogger(__name__).info("--seed-methods auto: %s", seed_methods)
        elif auto:
            seed_methods = None
        result = run(
            methods=methods,
            learning_rates=_grids_of(methods, grids),
            seeds=seeds if seed_methods or not auto else [],
            seed_methods=seed_methods,
            report_only=args.report_only,
            save_adapters=_names(args.save_adapters or ""),
        )
        if task:
            print(f"\n## {task}\n")
        print(result.to_markdown())
        print(f"\nwritten: {os.path.join(output_dir, 'comparison.{json,md,png}')}")
    return 0
