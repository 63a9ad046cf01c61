"""`cofitune demo`: the end-to-end experiment on the embedded SmolLM2-135M-Instruct, offline.

Speciality: two-operand arithmetic (`data.arithmetic_task`; the base model solves few). Versatility: country-capital
probes (short answer and multiple choice) and the label-free drift measures on general prose (cross-entropy increase
and KL to the base model), combined by `VersatilityEval`. Every method gets the same data, steps, batch and seed
(`training.train_sft`), each at its own learning rate:

- base (no training), full fine-tuning, LoRA r16 on all linear modules,
- CoFiTune coarse only (default window, FFN, no mask),
- CoFiTune with the soft mask in `update` mode (this package's default) and in the paper's `gradient` mode.

It prints a Spec./Vers./Uni. table, writes `results.json` and `results.png` (`plotting.plot_demo_results`), and saves
the CoFiTune adapter. CoFiTune's rows are labelled from the config `get_peft_model` resolved (window and modules).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from cofitune_peft import CoFiTuneError

logger = logging.getLogger(__name__)

METHODS = ("base", "full_ft", "lora_r16", "cofitune_coarse", "cofitune_update", "cofitune_gradient")
#: Labels of the baselines; CoFiTune's rows are labelled from the config `get_peft_model` resolved (`method_label`).
LABELS = {
    "base": "base (no training)",
    "full_ft": "full fine-tuning",
    "lora_r16": "LoRA r16, all linear",
}


@dataclass
class DemoSettings:
    """Sizes and budgets of one demo run; `QUICK` and `DEFAULT` are the two presets."""

    steps: int = 60
    batch_size: int = 8
    n_test: int = 100
    n_probes: int = 40
    n_general: int = 24
    importance_samples: int = 64
    max_new_tokens: int = 24
    seed: int = 0
    # One learning rate per method, not tuned on the test set: the Trainer's default for full fine-tuning, the
    # common 2e-4 for LoRA, and the same for CoFiTune's full-rank FFN deltas (docs/results.md discusses this).
    learning_rates: dict[str, float] = field(
        default_factory=lambda: {
            "full_ft": 5e-5,
            "lora_r16": 2e-4,
            "cofitune_coarse": 2e-4,
            "cofitune_update": 2e-4,
            "cofitune_gradient": 2e-4,
        }
    )


# Sized for 2 CPU cores: --quick under 5 minutes, the default under 30 (full fine-tuning's step is ~4x the others').
QUICK = DemoSettings(steps=8, n_test=16, n_probes=12, n_general=6, importance_samples=16, max_new_tokens=16)
DEFAULT = DemoSettings()


@dataclass
class DemoData:
    """What every method shares: the training set, the tokenizer and the two evaluations."""

    train: object
    tokenizer: object
    speciality: object
    versatility: object


def _rows(dataset) -> list[dict]:
    return [dict(row) for row in dataset]


def _fresh_model(method: str, importance):
    from peft import LoraConfig, get_peft_model

    from cofitune_peft import CoFiTuneConfig

    from .loading import load_smollm2

    model, _ = load_smollm2()
    if method in ("base", "full_ft"):
        return model
    if method == "lora_r16":
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    if method == "cofitune_coarse":
        return get_peft_model(model, CoFiTuneConfig())
    mode = "update" if method == "cofitune_update" else "gradient"
    return get_peft_model(model, CoFiTuneConfig(importance=importance, softmask_mode=mode))


def method_label(method: str, model) -> str:
    """A row's label; for CoFiTune, from the resolved config, e.g. "CoFiTune coarse (FFN 7..14, no mask)"."""
    if method in LABELS:
        return LABELS[method]
    config = model.peft_config[model.active_adapter]
    units = _modules_label(config.target_modules)
    if config.layers is None:
        window = f"{units}, all layers"
    else:
        first, last = config.layers[0], config.layers[1] - 1
        window = f"{units} {first}..{last}" if last > first else f"{units} {first}"
    masked = (config.importance_source or config.importance) is not None and config.softmask_mode != "none"
    if not masked:
        return f"CoFiTune coarse ({window}, no mask)"
    mode = config.softmask_mode + (", paper" if config.softmask_mode == "gradient" else "")
    return f"CoFiTune ({window}) + soft mask ({mode})"


def _modules_label(target_modules: str | list[str]) -> str:
    """`target_modules` in a label: "ffn" -> "FFN", "ffn+mha" -> "FFN+MHA", "mha+o" -> "MHA+o"; lists joined by "+"."""
    parts = target_modules.split("+") if isinstance(target_modules, str) else target_modules
    return "+".join(part.upper() if part in ("ffn", "mha") else part for part in parts)


def _prepare_data(settings: DemoSettings, base, tokenizer, progress: bool) -> DemoData:
    """The arithmetic training and test sets, the capital probes and the general prose, as evaluations."""
    from .data import arithmetic_task, capital_probes, general_texts
    from .evaluation import SpecialityEval, VersatilityEval, extract_number

    train, test = arithmetic_task(n_train=max(2000, settings.steps * settings.batch_size), n_test=settings.n_test)
    probes = _rows(capital_probes(settings.n_probes, kind="short")) + _rows(
        capital_probes(settings.n_probes, kind="mc")
    )
    general = general_texts(n=settings.n_general, split="eval")["text"]
    speciality = SpecialityEval.exact_match(
        _rows(test),
        answer_extractor=extract_number,
        numeric=True,
        max_new_tokens=settings.max_new_tokens,
        batch_size=16,
        tokenizer=tokenizer,
        progress=progress,
        name="arithmetic",
    )
    versatility = VersatilityEval.default(
        general, probes=probes, base_model=base, tokenizer=tokenizer, progress=progress
    )
    return DemoData(train=train, tokenizer=tokenizer, speciality=speciality, versatility=versatility)


def _importance(settings: DemoSettings, base, tokenizer, output_dir: str, progress: bool):
    """Importance from general prose for the soft mask; saved and drawn into `output_dir`."""
    from cofitune_peft import estimate_importance

    from .data import general_texts

    t0 = time.perf_counter()
    importance = estimate_importance(
        base,
        general_texts(n=settings.importance_samples, split="importance"),
        tokenizer=tokenizer,
        num_samples=settings.importance_samples,
        max_length=256,
        progress=progress,
    )
    importance.metadata["seconds"] = f"{time.perf_counter() - t0:.1f}"
    importance.save(os.path.join(output_dir, "importance.safetensors"))
    importance.plot(os.path.join(output_dir, "importance.png"), title="SmolLM2-135M-Instruct importance")
    return importance


def _run_method(method: str, importance, data: DemoData, settings: DemoSettings, output_dir: str, progress: bool):
    """Train one method on a fresh model (except `base`), evaluate it, and return its record."""
    from .training import train_sft

    model = _fresh_model(method, importance)
    record: dict = {"method": method, "label": method_label(method, model)}
    if method != "base":
        lr = settings.learning_rates[method]
        stats = train_sft(
            model,
            data.train,
            tokenizer=data.tokenizer,
            steps=settings.steps,
            learning_rate=lr,
            batch_size=settings.batch_size,
            max_length=128,
            seed=settings.seed,
            progress=progress,
        )
        record.update(
            learning_rate=lr,
            train_seconds=stats["seconds"],
            final_loss=stats["final_loss"],
            trainable_parameters=stats["trainable_parameters"],
        )
    model.eval()
    spec = data.speciality.evaluate(model, data.tokenizer)
    vers = data.versatility.evaluate(model, data.tokenizer)
    record.update(speciality=spec["score"], versatility=vers["score"], versatility_parts=_parts(vers))
    if method == "cofitune_update":
        model.save_pretrained(os.path.join(output_dir, "cofitune_adapter"))
        record["adapter"] = os.path.join(output_dir, "cofitune_adapter")
    logger.info("%s: speciality %.3f, versatility %.3f", method, spec["score"], vers["score"])
    return record


def _add_scores(results: dict[str, dict]) -> None:
    """Spec. relative to base and full fine-tuning, Vers., and Uni., on every record."""
    from .evaluation import speciality_score, unified_score

    base_spec, full_spec = results["base"]["speciality"], results["full_ft"]["speciality"]
    for record in results.values():
        try:
            record["Spec."] = speciality_score(record["speciality"], base_spec, full_spec)
        except CoFiTuneError:
            record["Spec."] = float("nan")
        record["Vers."] = record["versatility"]
        record["Uni."] = unified_score(record["Spec."], record["Vers."])


def run_demo(
    settings: DemoSettings, output_dir: str, methods: tuple[str, ...] = METHODS, progress: bool = True
) -> dict:
    """Run the experiment and return its results (also written to `output_dir`)."""
    from tqdm.auto import tqdm

    from .loading import load_smollm2

    if "base" not in methods or "full_ft" not in methods:
        raise CoFiTuneError(f"`methods` must include 'base' and 'full_ft' (Spec. is relative to them), got {methods}.")
    os.makedirs(output_dir, exist_ok=True)
    started = time.perf_counter()
    base, tokenizer = load_smollm2()
    data = _prepare_data(settings, base, tokenizer, progress)
    importance = None
    if any(m.startswith("cofitune_") and m != "cofitune_coarse" for m in methods):
        importance = _importance(settings, base, tokenizer, output_dir, progress)
    del base

    results: dict[str, dict] = {}
    for method in tqdm(methods, desc="methods", disable=not progress):
        results[method] = _run_method(method, importance, data, settings, output_dir, progress)
    _add_scores(results)
    summary = {
        "settings": asdict(settings),
        "results": results,
        "seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    summary["table"] = to_markdown(results)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    plot(results, os.path.join(output_dir, "results.png"), summary["settings"])
    return summary


def _parts(vers: dict) -> dict:
    return {k: v for k, v in vers.items() if isinstance(v, (int, float)) and k != "score"}


def to_markdown(results: dict[str, dict]) -> str:
    header = ["method", "arithmetic acc.", "Spec.", "Vers.", "Uni.", "CE increase", "KL to base", "probes (gen/MC)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results.values():
        parts = r.get("versatility_parts", {})
        gen, mc = parts.get("probes_gen_accuracy", float("nan")), parts.get("probes_mc_accuracy", float("nan"))
        probes = f"{gen:.2f} / {mc:.2f}"
        cells = [
            r["label"],
            f"{r['speciality']:.3f}",
            f"{r['Spec.']:.3f}",
            f"{r['Vers.']:.3f}",
            f"{r['Uni.']:.3f}",
            f"{parts.get('ce_increase', float('nan')):.4f}",
            f"{parts.get('kl', float('nan')):.4f}",
            probes,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str, settings: dict | None = None) -> str:
    """The results picture (Spec., Vers. and Uni. per method) as a PNG; `settings` (as in `results.json`) titles it."""
    from .plotting import plot_demo_results

    title = "CoFiTune vs baselines on SmolLM2-135M-Instruct"
    if settings and "steps" in settings and "batch_size" in settings:
        steps = settings["steps"]
        title += f": {steps} step{'s' * (steps != 1)} of arithmetic SFT (batch {settings['batch_size']}) per method"
    return plot_demo_results(results, path, title=title)


# ------------------------------------------------------------------ CLI


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the small preset (under 5 minutes on 2 CPU cores)")
    parser.add_argument("--output-dir", default="outputs/demo", help="where results and the adapter go")
    parser.add_argument("--steps", type=int, help="override the preset's optimizer steps")
    parser.add_argument(
        "--learning-rate",
        nargs=2,
        action="append",
        metavar=("METHOD", "LR"),
        help="override one method's learning rate, e.g. --learning-rate cofitune_update 1e-4 (repeatable)",
    )
    parser.add_argument("--methods", nargs="*", choices=METHODS, help="a subset of the methods (base, full_ft needed)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true")


def demo_command(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else DEFAULT
    if args.steps is not None:
        if args.steps < 1:
            raise CoFiTuneError(f"`--steps` must be >= 1, got {args.steps}.")
        settings = replace(settings, steps=args.steps)
    if args.learning_rate:
        rates = dict(settings.learning_rates)
        for method, value in args.learning_rate:
            if method not in rates:
                raise CoFiTuneError(f"`--learning-rate` method must be one of {sorted(rates)}, got {method!r}.")
            try:
                rates[method] = float(value)
            except ValueError:
                raise CoFiTuneError(f"`--learning-rate {method}` must be a number, got {value!r}.") from None
        settings = replace(settings, learning_rates=rates)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = tuple(args.methods) if args.methods else METHODS
    summary = run_demo(settings, args.output_dir, methods=methods, progress=not args.no_progress)
    print(summary["table"])
    print(f"\nresults: {args.output_dir}/results.json, {args.output_dir}/results.png")
    print(f"CoFiTune adapter: {args.output_dir}/cofitune_adapter  ({summary['seconds'] / 60:.1f} min)")
    return 0
