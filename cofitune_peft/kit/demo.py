"""`cofitune demo`: does CoFiTune keep more general ability than LoRA or full fine-tuning at the same domain gain?

The end-to-end experiment on the embedded SmolLM2-135M-Instruct, offline, as a small `compare_methods` run: base
(no training), full fine-tuning, LoRA r16 on all linear modules, CoFiTune coarse (default window, FFN, no mask) and
CoFiTune with the project's default soft mask (`DEMO_MASK`), each over its own three-point learning-rate grid, on the
number-only arithmetic task ("What is 47 + 38?" -> "85": the regime in which fine-tuning forgets, docs/results.md).
Every run is scored on a validation split (which picks each method's learning rate: best validation Uni.) and on a
disjoint test split (which reports it). Versatility is the retention of country-capital probes (generated short
answers and multiple choice) and of the model's distribution on general prose (CE drift, KL to the base model), each
relative to the base model and capped at 1.

It prints the selected points, the frontier and the comparison at equal speciality, a verdict, and writes
`comparison.{json,md,png}` (`compare_methods`' outputs) and `demo.json` to the output directory, with the adapters of
the mask method's runs under `adapters/`. `--quick` is a smoke run of the same pipeline (one learning rate per method,
8-question eval splits, under 5 minutes): it shows the mechanics, selects nothing and answers nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from cofitune_peft import CoFiTuneError

from .loading import BASE_MODEL_ID_HELP

logger = logging.getLogger(__name__)

#: The mask variant the demo (and `CoFiTuneConfig`'s documentation) recommends, chosen on the validation splits of the
#: committed comparison (docs/results.md, "Which mask variant").
DEMO_MASK = "cofitune_mask"
METHODS = ("base", "full", "lora", "cofitune", DEMO_MASK)
DEFAULT_GRIDS = {
    "full": (3e-5, 1e-4, 3e-4),
    "lora": (3e-4, 1e-3, 3e-3),
    # On arithmetic the coarse window collapses at 1e-3 after 40 steps (docs/results.md): its grid sits lower.
    "cofitune": (1e-4, 3e-4, 1e-3),
    DEMO_MASK: (2e-4, 6e-4, 2e-3),
}


@dataclass
class DemoSettings:
    """Sizes and budgets of one demo run; `QUICK` and `DEFAULT` are the two presets."""

    task: str = "arithmetic"
    steps: int = 24
    batch_size: int = 8
    max_length: int = 128
    n_eval: int = 24
    n_general: int = 6
    importance_samples: int = 24
    max_new_tokens: int = 16
    seed: int = 0
    grids: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_GRIDS))


# Sized for 2 CPU cores: the default under 30 minutes, --quick under 5.
DEFAULT = DemoSettings()
QUICK = DemoSettings(
    steps=10,
    n_eval=8,
    n_general=2,
    importance_samples=6,
    grids={name: values[1:2] for name, values in DEFAULT_GRIDS.items()},  # one rate each: it selects nothing
)


def noise_phrase(result, a_key: str, b_key: str, metric: str, diff: float) -> str:
    """How a difference of `metric` between two runs reads against the item noise: "within noise" when it is smaller
    than one item's worth (`ComparisonResult.item_worth`) or its paired bootstrap interval holds 0, else the interval.
    The demo runs one seed, so a difference beyond the item noise is still unmeasured against the seed spread."""
    worth = result.item_worth(metric)
    bounds = result.interval(a_key, b_key, metric)
    if worth is not None and abs(diff) < worth:
        return f"within noise: less than one item ({worth:.3f})"
    if bounds is not None and bounds[0] <= 0.0 <= bounds[1]:
        return f"within noise: interval [{bounds[0]:+.3f}, {bounds[1]:+.3f}]"
    if bounds is None:
        return f"{diff:+.3f}, no per-item scores to judge it"
    return f"{diff:+.3f}, beyond the item noise [{bounds[0]:+.3f}, {bounds[1]:+.3f}]; one seed"


def verdict(result, baselines=("lora", "full"), cofitune=("cofitune", DEMO_MASK)) -> list[str]:
    """Plain sentences comparing each CoFiTune method with each baseline, from a `ComparisonResult`: the selected
    points (test Spec., Vers. and Uni.) and the best Vers. at the Spec. the baseline's selected point reaches, each
    difference read against the item noise (`noise_phrase`: "within noise" when smaller than one item's worth or
    inside its paired bootstrap interval)."""
    lines = []
    for ours in cofitune:
        if ours not in result.selected:
            continue
        mine_row = result.selected[ours]
        mine = mine_row["test"]
        label = result.methods[ours]["label"]
        for other in baselines:
            if other not in result.selected:
                continue
            theirs_row = result.selected[other]
            theirs = theirs_row["test"]
            if not math.isfinite(theirs["spec"]):
                continue
            parts = []
            for metric, name in (("spec", "Spec."), ("vers", "Vers."), ("uni", "Uni.")):
                a, b = mine[metric], theirs[metric]
                phrase = noise_phrase(result, mine_row["key"], theirs_row["key"], metric, a - b)
                parts.append(f"{name} {a:.3f} vs {b:.3f} ({phrase})")
            at = result.at_equal_speciality(levels=(theirs["spec"],))[ours][theirs["spec"]]
            if at:
                phrase = noise_phrase(result, at["key"], theirs_row["key"], "vers", at["vers"] - theirs["vers"])
                reach = (f"at its Spec. ({theirs['spec']:.2f}) {label} keeps Vers. {at['vers']:.3f} against "
                         f"{theirs['vers']:.3f} ({phrase})")  # fmt: skip
            else:
                reach = f"{label} never reaches its Spec. ({theirs['spec']:.2f})"
            lines.append(
                f"{label} vs {result.methods[other]['label']}: selected points " + "; ".join(parts) + f"; {reach}."
            )
    return lines


def run_demo(
    settings: DemoSettings,
    output_dir: str,
    model: str = "smollm2",
    progress: bool = True,
    base_model_id: str | None = None,
) -> dict:
    """Run the experiment and return its summary (also written to `output_dir/demo.json`). `base_model_id` is the Hub
    id the saved adapters record as their base model (default: `HuggingFaceTB/SmolLM2-135M-Instruct` for the embedded
    model, `model` itself when it is a Hub id)."""
    from .compare import MethodSettings, compare_methods
    from .compare.tasks import model_loader, task_splits

    started = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    loader, tokenizer = model_loader(model, base_model_id=base_model_id)
    train, splits, general = task_splits(
        settings.task,
        tokenizer,
        n_train=max(2000, settings.steps * settings.batch_size),
        n_eval=settings.n_eval,
        n_general=settings.n_general,
        importance_samples=settings.importance_samples,
        max_new_tokens=settings.max_new_tokens,
        progress=progress,
    )
    methods = [m for m in METHODS if m in settings.grids or m == "base"]
    result = compare_methods(
        loader,
        train,
        tokenizer=tokenizer,
        validation=splits["validation"],
        test=splits["test"],
        steps=settings.steps,
        output_dir=output_dir,
        methods=methods,
        learning_rates=settings.grids,
        settings=MethodSettings(general_texts=general),
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        seed=settings.seed,
        importance_kwargs={"num_samples": settings.importance_samples},
        save_adapters=[DEMO_MASK],
        progress=progress,
    )
    chosen = result.selected.get(DEMO_MASK)
    adapter = None
    if chosen is not None:
        source = os.path.join(output_dir, "adapters", chosen["key"])  # saved when the run trained
        if os.path.isdir(source):
            adapter = source
    summary = {
        "settings": asdict(settings),
        "seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "table": result.to_markdown(),
        "verdict": verdict(result),
        "adapter": adapter,
        "comparison": os.path.join(output_dir, "comparison.json"),
    }
    with open(os.path.join(output_dir, "demo.json"), "w") as fh:
        json.dump(summary, fh, indent=2, default=float)
    return summary


# ------------------------------------------------------------------ CLI


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the smoke preset (under 5 minutes on 2 CPU cores)")
    parser.add_argument("--output-dir", default="outputs/demo", help="where results and the adapter go (resumable)")
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a local model folder")
    parser.add_argument("--base-model-id", help=BASE_MODEL_ID_HELP)
    parser.add_argument("--steps", type=int, help="override the preset's optimizer steps")
    parser.add_argument(
        "--lr", action="append", metavar="METHOD=V1,V2,V3", help=f"a method's grid (methods: {', '.join(METHODS[1:])})"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true")


def demo_command(args: argparse.Namespace) -> int:
    from .compare.command import parse_grids

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = QUICK if args.quick else DEFAULT
    if args.steps is not None:
        if args.steps < 1:
            raise CoFiTuneError(f"`--steps` must be >= 1, got {args.steps}.")
        settings = replace(settings, steps=args.steps)
    grids = parse_grids(args.lr)
    unknown = sorted(set(grids) - set(METHODS[1:]))
    if unknown:
        raise CoFiTuneError(f"`--lr`: the demo compares {list(METHODS[1:])}, got {unknown}; use `cofitune compare`.")
    if grids:
        settings = replace(settings, grids={**settings.grids, **{k: tuple(v) for k, v in grids.items()}})
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = run_demo(
            settings,
            args.output_dir,
            model=args.model,
            progress=not args.no_progress,
            base_model_id=args.base_model_id,
        )
    except CoFiTuneError as err:
        if "Spec. is undefined" not in str(err):
            raise
        raise CoFiTuneError(
            f"{err}\nThe demo's runs are too short for full fine-tuning to learn the task ({settings.steps} steps); "
            "raise `--steps` (the cached runs of other settings are not reused: use a new `--output-dir`)."
        ) from None
    print(summary["table"])
    print("\nVerdict (test split, each method at its learning rate selected on validation):")
    for line in summary["verdict"]:
        print(f"- {line}")
    print(f"\nresults: {args.output_dir}/comparison.{{json,md,png}}, {args.output_dir}/demo.json")
    if summary["adapter"]:
        print(f"CoFiTune adapter (selected run): {summary['adapter']}")
    print(f"({summary['seconds'] / 60:.1f} min)")
    return 0
