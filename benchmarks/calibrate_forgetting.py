"""A regime that forgets: at which budget does fine-tuning SmolLM2 on a speciality task cost versatility?

At the demo's budget (60 steps of batch 8) no method loses measurable versatility. This script trains, on the
arithmetic task in number-only answer format (`arithmetic_task(completion_style="answer")`: "What is 47 + 38?" ->
"85"), full fine-tuning and CoFiTune coarse (`CoFiTuneConfig(softmask_mode="none")`, default window) over a grid of
learning rates, each on a fresh copy of the base model with the same data, steps, batch and seed (`train_sft`), and
measures for the base model and every run:

- arithmetic exact-match accuracy on held-out questions (greedy);
- generated short-answer accuracy on country-capital probes (greedy, a few new tokens, the answer as whole words in
  the reply), and the fraction of those replies that are a bare number;
- likelihood-scored 4-way multiple-choice accuracy on the same countries' capitals;
- KL(base || tuned) per token and the cross-entropy increase on held-out general prose (`VersatilityEval`).

With `--task knowledge` (or `words`) the speciality is the comparison's task of that name
(`cofitune_peft.kit.compare.tasks.task_data`: for knowledge, facts about made-up people asked on held-out
paraphrases, `--n-test` questions about distinct facts, every fact taught) and `--probes mixed` takes the comparison's
probes (capitals and chemical symbols, `probe_splits`) instead of capitals alone.

The forgetting criterion: a run *forgets* when its generated-probe accuracy is at least `--criterion` (default 20%)
lower than the base model's, relatively: `1 - acc_run / acc_base >= 0.2`.

    OMP_NUM_THREADS=2 python benchmarks/calibrate_forgetting.py [--task arithmetic] [--steps 150] [--batch 8] \
        [--lrs full_ft 3e-5 1e-4] [--lrs cofitune 3e-4 1e-3] [--probes capitals] [--threads 2] [--out PATH]

Runs go in order of decreasing learning rate within each method, the methods interleaved (full FT at its highest
rate, CoFiTune at its highest, then the next rates), and the JSON is rewritten after each run, so an interrupted
calibration keeps its most informative runs. Prints a markdown table; JSON to
`benchmarks/results/forgetting_calibration.json` by default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

METHODS = ("full_ft", "cofitune")
LABELS = {"full_ft": "full fine-tuning", "cofitune": "CoFiTune coarse"}
DEFAULT_LRS = {"full_ft": [3e-5, 1e-4], "cofitune": [3e-4, 1e-3]}
_BARE_NUMBER = re.compile(r"\s*[-+]?\d[\d,]*(\.\d+)?\s*\.?\s*")


@dataclass
class Settings:
    """Sizes and budgets of one calibration."""

    task: str = "arithmetic"
    probes: str = "capitals"  # or "mixed": capitals and chemical symbols (`probe_splits`)
    steps: int = 150
    batch: int = 8
    lrs: dict[str, list[float]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_LRS.items()})
    n_train: int = 2000
    n_test: int = 100
    n_probes: int = 40
    n_general: int = 24
    arithmetic_new_tokens: int = 16
    probe_new_tokens: int = 16
    train_max_length: int = 128
    general_max_length: int = 256
    seed: int = 0
    criterion: float = 0.2


@dataclass
class Evals:
    """What every run shares: the training set, the tokenizer and the three evaluators."""

    train: Any
    tokenizer: Any
    arithmetic: Any  # SpecialityEval of the task (exact match on numbers for arithmetic)
    probes_gen: Any  # SpecialityEval, generated short answers ("contains" match)
    versatility: Any  # VersatilityEval: multiple-choice probes, CE and KL on general prose


def build_evals(base, tokenizer, settings: Settings, progress: bool = True) -> Evals:
    """The task's data, the probes and the general prose, as evaluators (base reference computed)."""
    from cofitune_peft.kit.compare.tasks import task_data
    from cofitune_peft.kit.data import arithmetic_task, capital_probes, general_texts, probe_splits
    from cofitune_peft.kit.evaluation import SpecialityEval, VersatilityEval, extract_number

    if settings.task == "arithmetic":
        train, test = arithmetic_task(
            n_train=settings.n_train, n_test=settings.n_test, seed=settings.seed, completion_style="answer"
        )
        scoring = {"answer_extractor": extract_number, "numeric": True}
    else:
        train, test, scoring = task_data(settings.task, settings.n_train, settings.n_test)
    if settings.probes == "mixed":
        probes = probe_splits({"test": settings.n_probes}, seed=settings.seed)["test"]
        short = [p for p in probes if "options" not in p]
        mc = [p for p in probes if "options" in p]
    else:
        short = [dict(r) for r in capital_probes(settings.n_probes, seed=settings.seed, kind="short")]
        mc = [dict(r) for r in capital_probes(settings.n_probes, seed=settings.seed, kind="mc")]
    general = general_texts(n=settings.n_general, split="eval", seed=settings.seed)["text"]
    common = {"tokenizer": tokenizer, "progress": progress}
    arithmetic = SpecialityEval.exact_match(
        [dict(r) for r in test],
        max_new_tokens=settings.arithmetic_new_tokens,
        batch_size=16,
        name=settings.task,
        **scoring,
        **common,
    )
    probes_gen = SpecialityEval.exact_match(
        short, match="contains", max_new_tokens=settings.probe_new_tokens, name="probes (answer)", **common
    )
    versatility = VersatilityEval.default(
        general, probes=mc, base_model=base, max_length=settings.general_max_length, **common
    )
    return Evals(
        train=train, tokenizer=tokenizer, arithmetic=arithmetic, probes_gen=probes_gen, versatility=versatility
    )


def is_bare_number(reply: str) -> bool:
    """Whether a generated reply is a number and nothing else ("85", " 1,024.")."""
    return _BARE_NUMBER.fullmatch(reply) is not None


def evaluate(model, evals: Evals, n_samples: int = 6) -> dict[str, Any]:
    """Every measure of one model, plus a few of its probe replies."""
    model.eval()
    arithmetic = evals.arithmetic.evaluate(model)
    gen = evals.probes_gen.evaluate(model)
    vers = evals.versatility.evaluate(model)
    replies = [p["generated"] for p in gen["predictions"]]
    return {
        "arithmetic_accuracy": arithmetic["score"],  # the task's accuracy (the key predates the other tasks)
        "probe_gen_accuracy": gen["score"],
        "probe_gen_bare_number_fraction": sum(map(is_bare_number, replies)) / len(replies),
        "probe_mc_accuracy": vers.get("probes_mc_accuracy", float("nan")),
        "kl_to_base": vers["kl"],
        "ce_increase": vers["ce_increase"],
        "ce": vers["ce"],
        "probe_samples": [
            {"prompt": ex["prompt"], "reference": p["reference"], "reply": p["generated"]}
            for ex, p in zip(evals.probes_gen.examples[:n_samples], gen["predictions"][:n_samples])
        ],
    }


def fresh_model(method: str, load_base: Callable[[], Any]):
    """A fresh base model, wrapped for `method`: the whole model for full FT, CoFiTune coarse (no mask) otherwise."""
    from peft import get_peft_model

    from cofitune_peft import CoFiTuneConfig

    model = load_base()
    if method == "full_ft":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "cofitune":
        return get_peft_model(model, CoFiTuneConfig(softmask_mode="none"))
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def run_label(method: str, model) -> str:
    if method != "cofitune":
        return LABELS[method]
    config = model.peft_config[model.active_adapter]
    first, last = config.layers[0], config.layers[1] - 1
    return f"CoFiTune coarse (FFN {first}..{last}, no mask)"


def run_order(lrs: dict[str, list[float]]) -> list[tuple[str, float]]:
    """`(method, lr)` pairs: each method's highest rate first, methods interleaved, then the next rates."""
    ranked = {m: sorted(lrs.get(m, []), reverse=True) for m in METHODS}
    depth = max((len(v) for v in ranked.values()), default=0)
    return [(m, ranked[m][i]) for i in range(depth) for m in METHODS if i < len(ranked[m])]


def train_and_evaluate(method: str, lr: float, load_base, evals: Evals, settings: Settings, progress: bool = True):
    """Train one run on a fresh model and evaluate it; its record."""
    from cofitune_peft.kit.training import train_sft

    model = fresh_model(method, load_base)
    stats = train_sft(
        model,
        evals.train,
        tokenizer=evals.tokenizer,
        steps=settings.steps,
        learning_rate=lr,
        batch_size=settings.batch,
        max_length=settings.train_max_length,
        seed=settings.seed,
        progress=progress,
    )
    t0 = time.perf_counter()
    record = {
        "method": method,
        "label": run_label(method, model),
        "learning_rate": lr,
        "train_seconds": stats["seconds"],
        "seconds_per_step": stats["seconds"] / settings.steps,
        "first_loss": stats["losses"][0],
        "final_loss": stats["final_loss"],
        "trainable_parameters": stats["trainable_parameters"],
        **evaluate(model, evals),
    }
    record["eval_seconds"] = time.perf_counter() - t0
    return record


def projected_seconds(method: str, done: list[dict[str, Any]]) -> float:
    """A run's expected train + eval seconds: the mean of the same method's finished runs, else of all of them."""
    same = [r for r in done if r["method"] == method] or done
    if not same:
        return 0.0
    return sum(r["train_seconds"] + r["eval_seconds"] for r in same) / len(same)


def add_drops(base: dict[str, Any], runs: list[dict[str, Any]], criterion: float) -> None:
    """The relative drop of generated-probe accuracy vs the base model, and whether it meets the criterion."""
    for record in runs:
        if base["probe_gen_accuracy"] > 0:
            drop = 1.0 - record["probe_gen_accuracy"] / base["probe_gen_accuracy"]
            record["probe_gen_relative_drop"] = drop
            record["forgets"] = drop >= criterion - 1e-9  # 16/40 vs 20/40 is a drop of exactly 20%
        else:  # the base model solves no probe: nothing to lose, no verdict
            record["probe_gen_relative_drop"] = None
            record["forgets"] = None


def to_markdown(base: dict[str, Any], runs: list[dict[str, Any]], criterion: float) -> str:
    header = [
        "run",
        "lr",
        "speciality acc.",
        "probes gen.",
        "gen. drop vs base",
        f"forgets (drop >= {criterion:.0%})",
        "bare-number replies",
        "probes MC",
        "KL to base",
        "CE increase",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(label, lr, r, drop, verdict):
        return [
            label,
            lr,
            f"{r['arithmetic_accuracy']:.2f}",
            f"{r['probe_gen_accuracy']:.3f}",
            drop,
            verdict,
            f"{r['probe_gen_bare_number_fraction']:.2f}",
            f"{r['probe_mc_accuracy']:.3f}",
            f"{r['kl_to_base']:.4f}",
            f"{r['ce_increase']:+.4f}",
        ]

    lines.append("| " + " | ".join(row("base (no training)", "-", base, "-", "-")) + " |")
    for r in runs:
        drop = "n/a" if r["probe_gen_relative_drop"] is None else f"{r['probe_gen_relative_drop']:+.0%}"
        verdict = "n/a" if r["forgets"] is None else ("**yes**" if r["forgets"] else "no")
        lines.append("| " + " | ".join(row(r["label"], f"{r['learning_rate']:.0e}", r, drop, verdict)) + " |")
    return "\n".join(lines)


def run_calibration(
    load_base: Callable[[], Any],
    tokenizer,
    settings: Settings,
    *,
    progress: bool = True,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    budget_seconds: float | None = None,
) -> dict[str, Any]:
    """Base scores, then every run of `settings.lrs` (see `run_order`); the summary (also passed to `on_update` after
    the base model and after each run, for incremental saving).

    With `budget_seconds`, a run whose projected time (`projected_seconds`) would end past the budget, and every run
    after it, is skipped and listed under `skipped` with the reason; the first run always goes.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    base_model = load_base()
    base_model.eval()
    evals = build_evals(base_model, tokenizer, settings, progress=progress)
    base = evaluate(base_model, evals)
    del base_model
    summary: dict[str, Any] = {
        "settings": asdict(settings),
        "criterion": f"generated-probe accuracy at least {settings.criterion:.0%} below the base model's (relative)",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": [],  # the machine's load at each update (other jobs share the cores)
        "base": base,
        "runs": [],
        "complete": False,
    }

    def publish():
        add_drops(base, summary["runs"], settings.criterion)
        summary["table"] = to_markdown(base, summary["runs"], settings.criterion)
        summary["seconds"] = time.perf_counter() - started
        summary["load_average_1min"].append(round(os.getloadavg()[0], 2))
        if on_update is not None:
            on_update(summary)

    publish()
    pending = run_order(settings.lrs)
    for method, lr in tqdm(list(pending), desc="runs", disable=not progress):
        projected = projected_seconds(method, summary["runs"])
        if (
            budget_seconds is not None
            and summary["runs"]
            and time.perf_counter() - started + projected > budget_seconds
        ):
            summary["skipped"] = [{"method": m, "learning_rate": r} for m, r in pending]
            summary["skipped_reason"] = (
                f"the next run ({method} at lr {lr:g}, ~{projected / 60:.1f} min by the runs so far) would end past "
                f"the {budget_seconds / 60:.0f}-minute budget"
            )
            break
        summary["runs"].append(train_and_evaluate(method, lr, load_base, evals, settings, progress=progress))
        pending.pop(0)
        publish()
    summary["complete"] = not summary.get("skipped")
    publish()
    return summary


# ------------------------------------------------------------------ CLI


def parse_lrs(groups: list[list[str]] | None) -> dict[str, list[float]]:
    """`--lrs METHOD LR [LR ...]` groups over the defaults: a named method gets exactly the given rates; a method
    given with no rate is left out."""
    lrs = {k: list(v) for k, v in DEFAULT_LRS.items()}
    for group in groups or []:
        method, *values = group
        if method not in METHODS:
            raise SystemExit(f"--lrs: method must be one of {METHODS}, got {method!r}")
        try:
            lrs[method] = [float(v) for v in values]
        except ValueError:
            raise SystemExit(f"--lrs {method}: learning rates must be numbers, got {values}") from None
    return lrs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="arithmetic", choices=("arithmetic", "words", "knowledge"))
    parser.add_argument("--probes", default="capitals", choices=("capitals", "mixed"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--lrs",
        nargs="+",
        action="append",
        metavar="METHOD_OR_LR",
        help="METHOD LR [LR ...], repeatable; METHOD in full_ft, cofitune (defaults: full_ft 3e-5 1e-4, cofitune "
        "3e-4 1e-3); a method with no rate is skipped",
    )
    parser.add_argument("--n-test", type=int, default=100, help="held-out speciality questions")
    parser.add_argument("--n-probes", type=int, default=40, help="probes of each kind")
    parser.add_argument("--n-general", type=int, default=24, help="general-prose passages for CE and KL")
    parser.add_argument("--probe-new-tokens", type=int, default=16)
    parser.add_argument("--criterion", type=float, default=0.2, help="relative drop of generated-probe accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="skip the remaining runs once the next one would end past this wall-clock budget (listed in the JSON)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "forgetting_calibration.json"),
    )
    args = parser.parse_args(argv)

    from cofitune_peft.kit.loading import load_smollm2

    torch.set_num_threads(args.threads)
    settings = Settings(
        task=args.task,
        probes=args.probes,
        steps=args.steps,
        batch=args.batch,
        lrs=parse_lrs(args.lrs),
        n_train=max(2000, args.steps * args.batch),
        n_test=args.n_test,
        n_probes=args.n_probes,
        n_general=args.n_general,
        probe_new_tokens=args.probe_new_tokens,
        seed=args.seed,
        criterion=args.criterion,
    )
    _, tokenizer = load_smollm2()

    def save(summary):
        summary = {**summary, "model": "SmolLM2-135M-Instruct (fp32, CPU)", "command": " ".join(sys.argv)}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2, default=float)
        os.replace(tmp, args.out)

    summary = run_calibration(
        lambda: load_smollm2()[0],
        tokenizer,
        settings,
        progress=not args.no_progress,
        on_update=save,
        budget_seconds=None if args.budget_minutes is None else 60 * args.budget_minutes,
    )
    print(summary["table"])
    if summary.get("skipped"):
        print(f"\nskipped: {summary['skipped']} ({summary['skipped_reason']})")
    print(f"\n{summary['seconds'] / 60:.1f} min; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
