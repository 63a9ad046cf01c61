"""`compare_methods`: every method over its learning-rate grid, on the same data, steps, batch and seed, scored on a
validation split (for selection) and a test split (for the report); cached per run and resumable.

METHOD.md ("How this project compares methods"): each method at its own best learning rate from a small sweep on a
validation split. CoFiTune is arXiv 2404.10306. Derived methods (`Method.derived_from`: WiSE-FT, CoFiTune's post-hoc
strength) train nothing: each of their values is scored right after each parent run trains, and cached like a run.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from cofitune_peft import CoFiTuneError
from cofitune_peft.utils import atomic_path, write_json_atomic

from ..fingerprint import fingerprint
from ..state_file import legacy_pickle_error, load_state, save_state
from ..training import train_sft
from .methods import Method, MethodSettings, resolve_methods
from .penalties import TrainingWrapper
from .report import ComparisonResult

logger = logging.getLogger(__name__)

DEFAULT_METHODS = (
    "base",
    "full",
    "lora",
    "cofitune",
    "cofitune_mask",
    "cofitune_gradient",
    "vsoftmask",
    "l1",
    "l2",
    "wiseft",
    "cofitune_alpha",
    "corda_kpm",
    "osf",
)


@dataclass
class EvalSplit:
    """The evaluators of one split: `speciality` (a `SpecialityEval` or `f(model, tokenizer) -> float | {"score"}`)
    and `versatility` (a `VersatilityEval`, a `HarnessVersatility`, or a callable whose score is divided by the base
    model's)."""

    speciality: Any
    versatility: Any


def _as_split(value, name: str) -> EvalSplit:
    if isinstance(value, EvalSplit):
        split = value
    elif isinstance(value, Sequence) and len(value) == 2:
        split = EvalSplit(*value)
    else:
        raise CoFiTuneError(f"`{name}` must be an EvalSplit or a (speciality, versatility) pair, got {value!r}.")
    if not callable(split.speciality) or not callable(split.versatility):
        raise CoFiTuneError(f"`{name}`: both evaluators must be callable (model, tokenizer), got {split!r}.")
    return split


def _prompts(items) -> set[str]:
    return {json.dumps(x.get("prompt"), sort_keys=True) for x in items if isinstance(x, Mapping) and "prompt" in x}


def _check_disjoint(validation: EvalSplit, test: EvalSplit, train: Sequence[Mapping]) -> None:
    """Validation and test must not share a question, probe or general text, nor the training data a question."""
    problems = []
    for part in ("speciality", "versatility"):
        a, b = getattr(validation, part), getattr(test, part)
        if a is b or (getattr(a, "fingerprint", None) and getattr(a, "fingerprint", None) == b.fingerprint):
            problems.append(f"the {part} evaluators of `validation` and `test` are the same; pass disjoint splits.")
    spec_v, spec_t = getattr(validation.speciality, "examples", []), getattr(test.speciality, "examples", [])
    if _prompts(spec_v) & _prompts(spec_t):
        problems.append(f"{len(_prompts(spec_v) & _prompts(spec_t))} speciality questions are in both splits.")
    train_prompts = _prompts(train)
    for name, items in (("validation", spec_v), ("test", spec_t)):
        if _prompts(items) & train_prompts:
            problems.append(f"{len(_prompts(items) & train_prompts)} {name} speciality questions are training data.")
    probes_v, probes_t = getattr(validation.versatility, "probes", []), getattr(test.versatility, "probes", [])
    if _prompts(probes_v) & _prompts(probes_t):
        problems.append(f"{len(_prompts(probes_v) & _prompts(probes_t))} versatility probes are in both splits.")
    texts_v = set(getattr(validation.versatility, "general_texts", []))
    if texts_v & set(getattr(test.versatility, "general_texts", [])):
        problems.append("some general texts of the versatility eval are in both splits.")
    if problems:
        raise CoFiTuneError("`validation` and `test` must be disjoint:\n  - " + "\n  - ".join(problems))


def _evaluate(evaluator, model, tokenizer) -> tuple[float, dict]:
    out = evaluator.evaluate(model, tokenizer) if hasattr(evaluator, "evaluate") else evaluator(model, tokenizer)
    if isinstance(out, Mapping):
        return float(out["score"]), dict(out)
    return float(out), {}


def _score_split(split: EvalSplit, model, tokenizer) -> dict[str, Any]:
    """One split's scores, and the per-item values paired bootstrap intervals resample (`intervals`)."""
    spec, spec_details = _evaluate(split.speciality, model, tokenizer)
    vers, details = _evaluate(split.versatility, model, tokenizer)
    versatility = {"score": vers, **{k: details[k] for k in ("components", "ce_increase", "kl") if k in details}}
    if "components" in details:
        versatility["weights"] = dict(getattr(split.versatility, "weights", {}) or {})
    items = dict(details.get("items") or {})
    if isinstance(spec_details.get("predictions"), list):
        items["speciality"] = [int(bool(p.get("correct"))) for p in spec_details["predictions"]]
    return {"speciality": spec, "versatility": versatility, "items": items}


def split_sizes(split: EvalSplit) -> dict[str, int]:
    """How many questions, generated and multiple-choice probes and general texts a split has (what can be counted)."""
    sizes = {}
    examples = getattr(split.speciality, "examples", None)
    if examples is not None:
        sizes["questions"] = len(examples)
    probes = getattr(split.versatility, "probes", None)
    if probes is not None:
        sizes["probes_gen"] = sum("options" not in p for p in probes)
        sizes["probes_mc"] = sum("options" in p for p in probes)
    texts = getattr(split.versatility, "general_texts", None)
    if texts is not None:
        sizes["general_texts"] = len(texts)
    return sizes


def _run_key(method: str, lr: float | None, seed: int, alpha: float | None = None) -> str:
    # `alpha`: a derived method's post-hoc value. The format is the cache's file names: changing it orphans every run.
    key = method if lr is None else f"{method}_lr{lr:.3g}"
    if alpha is not None:
        key += f"_a{alpha:g}"
    return f"{key}_s{seed}"


class _Comparison:
    """The state of one `compare_methods` call: settings, cached records, the base model's references, importance."""

    save_adapters: frozenset = frozenset()

    def __init__(self, model_loader, train, tokenizer, splits, methods, settings, train_kwargs, output_dir, progress):
        self.model_loader, self.train, self.tokenizer = model_loader, train, tokenizer
        self.splits, self.methods, self.settings = splits, methods, settings
        self.train_kwargs, self.output_dir, self.progress = train_kwargs, output_dir, progress
        self.runs_dir = os.path.join(output_dir, "runs")
        os.makedirs(self.runs_dir, exist_ok=True)

    def load_base(self):
        loaded = self.model_loader()
        return loaded[0] if isinstance(loaded, tuple) else loaded

    # -- settings and cache

    def check_settings(self) -> str:
        payload = {
            "split_sizes": {name: split_sizes(split) for name, split in self.splits.items()},
            "train": fingerprint(self.train),
            "train_kwargs": self.train_kwargs,
            "methods": self.settings.describe(),
            **{
                f"{name}_{part}": getattr(getattr(split, part), "fingerprint", None)
                or getattr(getattr(split, part), "__qualname__", type(getattr(split, part)).__qualname__)
                for name, split in self.splits.items()
                for part in ("speciality", "versatility")
            },
        }
        path = os.path.join(self.output_dir, "settings.json")
        if os.path.isfile(path):
            with open(path) as fh:
                saved = json.load(fh)
            changed = sorted(k for k in set(saved) | set(payload) if saved.get(k) != payload.get(k))
            if changed:
                raise CoFiTuneError(
                    f"`output_dir` {self.output_dir!r} holds a comparison with other settings (changed: {changed}); "
                    "use another `output_dir`, or delete that one to start over. Learning-rate grids, methods and "
                    "seeds may change between runs; data, steps, batch, evaluators and method settings may not."
                )
        else:
            write_json_atomic(path, payload)
        self.settings_key = fingerprint(payload)
        return self.settings_key

    def cached(self, key: str) -> dict | None:
        path = os.path.join(self.runs_dir, f"{key}.json")
        if not os.path.isfile(path):
            return None
        with open(path) as fh:
            record = json.load(fh)
        return record if record.get("settings_key") == self.settings_key else None

    def save(self, record: dict) -> dict:
        record["settings_key"] = self.settings_key
        write_json_atomic(os.path.join(self.runs_dir, f"{record['key']}.json"), record)
        return record

    def records(self) -> list[dict]:
        out = []
        for path in sorted(glob.glob(os.path.join(self.runs_dir, "*.json"))):
            with open(path) as fh:
                record = json.load(fh)
            if record.get("settings_key") == self.settings_key and record["method"] in self.methods:
                out.append(record)
        return out

    # -- the base model: references, importance, its own scores

    def prepare(self, seed: int, importance_kwargs: Mapping[str, Any]) -> None:
        base = self.load_base()
        base.eval()
        for name, split in self.splits.items():
            evaluator = split.versatility
            if not hasattr(evaluator, "prepare"):
                continue
            legacy = os.path.join(self.output_dir, f"reference-{name}.pt")
            if os.path.isfile(legacy):
                raise legacy_pickle_error(legacy, f"{name} task's versatility reference")
            path = os.path.join(self.output_dir, f"reference-{name}.safetensors")
            if os.path.isfile(path):
                state = load_state(path)  # refuses, by name, any file it did not write
                try:
                    evaluator.load_reference_state(state)
                    continue
                except CoFiTuneError:
                    logger.info("the saved %s reference is stale; recomputing it", name)
            evaluator.prepare(base, self.tokenizer)
            save_state(evaluator.reference_state(), path)
        if any(m.needs_importance for m in self.methods.values()):
            # Methods that estimate an importance of their own use the shared estimate's arguments (batch size, signal,
            # ...) except where their spec differs; arguments set in `settings.importance_kwargs` win.
            self.settings = replace(
                self.settings,
                importance=self._importance(base, importance_kwargs),
                importance_kwargs={**importance_kwargs, **self.settings.importance_kwargs},
            )
        key = _run_key("base", None, seed)
        if self.cached(key) is None:
            record = {"key": key, "method": "base", "learning_rate": None, "alpha": None, "seed": seed}
            record.update({name: _score_split(split, base, self.tokenizer) for name, split in self.splits.items()})
            self.save(record)
        del base

    def _importance(self, base, importance_kwargs):
        from cofitune_peft import Importance, estimate_importance

        texts = list(self.settings.general_texts)
        if not texts:
            raise CoFiTuneError(
                "the mask methods need general text for importance: pass `general_texts` (disjoint from the eval "
                "splits), or leave out 'cofitune_mask', 'cofitune_gradient' and 'vsoftmask'."
            )
        key = fingerprint([texts, dict(importance_kwargs), base.config.to_dict()])
        path = os.path.join(self.output_dir, f"importance-{key}.safetensors")
        if os.path.isfile(path):
            return Importance.load(path)
        importance = estimate_importance(
            base, texts, tokenizer=self.tokenizer, progress=self.progress, **dict(importance_kwargs)
        )
        importance.save(path)
        return importance

    # -- training jobs

    def run_job(
        self, method: Method, lr: float, seed: int, derived: Sequence[tuple] = (), own: bool = True, splits=None
    ) -> None:
        """Train `method` at `lr` with `seed` once; score it (if `own`) and its derived points `derived`, each a
        `(derived method, value)` pair, on `splits` (default: all)."""
        torch.manual_seed(seed)
        model = self.load_base()
        # The build may change the base in place (full fine-tuning): keep its weights for the derived points.
        base_state = (
            {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if v.is_floating_point()}
            if derived
            else {}
        )
        built = method.build(model, self.settings)
        train_data = method.train_data(self.train, self.settings) if method.train_data is not None else self.train
        stats = train_sft(
            built,
            train_data,
            tokenizer=self.tokenizer,
            learning_rate=lr,
            seed=seed,
            progress=self.progress,
            **self.train_kwargs,
        )
        trained = built.unwrap() if isinstance(built, TrainingWrapper) else built
        train = {k: stats[k] for k in ("seconds", "steps", "trainable_parameters", "final_loss", "mean_loss")}
        if own:
            if method.name in self.save_adapters and hasattr(trained, "peft_config"):
                path = os.path.join(self.output_dir, "adapters", _run_key(method.name, lr, seed))
                with atomic_path(path, directory=True) as tmp:
                    trained.save_pretrained(tmp)
            elif method.name in self.save_adapters:
                logger.warning("%s trains the whole model, not an adapter: no adapter saved for it", method.name)
            self._score_and_save(trained, method.name, lr, seed, None, train, splits)
        for child, value in derived:
            self._score_and_save(child.derive(trained, base_state, value), child.name, lr, seed, value, None, splits)

    def _score_and_save(self, model, method, lr, seed, alpha, train, splits=None) -> None:
        started = time.perf_counter()
        record = {"key": _run_key(method, lr, seed, alpha), "method": method, "learning_rate": lr, "alpha": alpha}
        record.update(seed=seed, train=train)
        names = splits or tuple(self.splits)
        record.update({name: _score_split(self.splits[name], model, self.tokenizer) for name in names})
        record["eval_seconds"] = time.perf_counter() - started
        self.save(record)

    def grid_points(self, seed: int, only: Mapping[str, Sequence[tuple]] | None = None) -> list[tuple]:
        """`(training method, lr, seed, derived points, own)` jobs whose results are missing; `only` restricts them to
        `{method: [(method, lr, alpha), ...]}`."""

        def wanted(name, lr, alpha):
            return only is None or (name, lr, alpha) in only.get(name, ())

        children: dict[str, list[Method]] = {}
        for method in self.methods.values():
            if method.derived_from is not None:
                children.setdefault(method.derived_from, []).append(method)
        jobs = []
        for name, method in self.methods.items():
            if not method.trains:
                continue
            for lr in method.learning_rates:
                own = wanted(name, lr, None) and self.cached(_run_key(name, lr, seed)) is None
                derived = tuple(
                    (child, value)
                    for child in children.get(name, ())
                    for value in child.learning_rates
                    if wanted(child.name, lr, value) and self.cached(_run_key(child.name, lr, seed, value)) is None
                )
                if own or derived:
                    jobs.append((method, lr, seed, derived, own))
        return jobs

    def run_jobs(self, jobs, desc: str, splits=None) -> None:
        for method, lr, seed, derived, own in tqdm(jobs, desc=desc, disable=not self.progress):
            points = ", ".join(f"{child.name} {value:g}" for child, value in derived)
            logger.info("%s: %s lr=%g seed=%d%s", desc, method.name, lr, seed, f" + {points}" if points else "")
            self.run_job(method, lr, seed, derived, own, splits)


def compare_methods(
    model_loader: Callable[[], Any],
    train_dataset: Sequence[Mapping[str, Any]],
    *,
    tokenizer,
    validation: EvalSplit | tuple,
    test: EvalSplit | tuple,
    steps: int,
    output_dir: str,
    methods: Sequence[str] = DEFAULT_METHODS,
    learning_rates: Mapping[str, Sequence[float]] | None = None,
    settings: MethodSettings | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    gradient_accumulation_steps: int = 1,
    seed: int = 0,
    seeds: Sequence[int] = (),
    seed_methods: Sequence[str] | None = None,
    save_adapters: Sequence[str] = (),
    report_only: bool = False,
    importance_kwargs: Mapping[str, Any] | None = None,
    weight: float = 0.5,
    progress: bool = True,
) -> ComparisonResult:
    """Compare fine-tuning methods at their own best learning rate, chosen on a validation split.

    Every method runs over its learning-rate grid (`methods.DEFAULT_LEARNING_RATES`, or `learning_rates`) with the
    same data, steps, batch and seed; every run is scored on `validation` and on `test`. A derived method (WiSE-FT,
    `cofitune_alpha`) trains nothing: its values are scored on each run of its parent, right after it trains, as grid
    points of their own. Each method's point is the best validation Uni. (Vers. capped at 1); Spec. is relative to the full fine-tuning run with the best validation
    speciality. Nothing about the test split enters either choice. Then the selected points run again with each of
    `seeds`, for a mean and spread (scored on the test split only: their validation scores would choose nothing).

    Args:
        model_loader (`Callable[[], PreTrainedModel]`): returns a fresh base model each call (a `(model, tokenizer)`
            pair is accepted).
        train_dataset (`Sequence[Mapping]`): training examples (see `train_sft`).
        tokenizer: the model's tokenizer.
        validation (`EvalSplit | tuple`): `(speciality, versatility)` evaluators for selection.
        test (`EvalSplit | tuple`): the same kinds of evaluators on disjoint questions, probes and texts.
        steps (`int`): optimizer steps of every run.
        output_dir (`str`): `settings.json`, `runs/<key>.json` per run, `comparison.{json,md,png}`. Re-running
            resumes; other data, steps, batch, evaluators or method settings raise `CoFiTuneError`.
        methods (`Sequence[str]`, *optional*): registry names (`base` and `full` are always added, and the parent of
            each derived method).
        learning_rates (`Mapping[str, Sequence[float]]`, *optional*): grids that replace the defaults (a derived
            method's: its post-hoc values, e.g. WiSE-FT's interpolation weights).
        settings (`MethodSettings`, *optional*): what builders read (CoFiTune window, LoRA rank, penalty strengths,
            general texts for importance and CorDA).
        batch_size, max_length, gradient_accumulation_steps: `train_sft`'s, the same for every run.
        seed (`int`, *optional*, defaults to 0): the seed of the sweep.
        seeds (`Sequence[int]`, *optional*): extra seeds for the selected points.
        seed_methods (`Sequence[str]`, *optional*): the methods whose selected points run with `seeds` (default:
            every compared method); the others report their one seed.
        save_adapters (`Sequence[str]`, *optional*): PEFT methods whose runs save their adapter, as trained in this
            call (a cached run saves nothing), to `output_dir/adapters/<run key>` (the row's `key`).
        report_only (`bool`, *optional*, defaults to `False`): train and score nothing; report the runs cached in
            `output_dir` (a comparison still running, or interrupted). Methods without a finished run are left out.
        importance_kwargs (`Mapping`, *optional*): `estimate_importance` arguments (e.g. `num_samples`).
        weight (`float`, *optional*, defaults to 0.5): Spec.'s weight in Uni.
        progress (`bool`, *optional*, defaults to `True`): tqdm bars.

    Returns:
        `ComparisonResult`, also written to `output_dir` as JSON, markdown and a PNG plot.

    Example:

    ```python
    >>> result = compare_methods(load, train, tokenizer=tok, validation=(spec_val, vers_val),
    ...                          test=(spec_test, vers_test), steps=150, output_dir="runs/compare")  # doctest: +SKIP
    >>> print(result.to_markdown())  # doctest: +SKIP
    ```
    """
    problems = []
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        problems.append(f"`steps` must be a positive int, got {steps!r}.")
    if not 0.0 <= weight <= 1.0:
        problems.append(f"`weight` must lie in [0, 1], got {weight!r}.")
    train_dataset = [dict(x) for x in train_dataset]
    if not train_dataset:
        problems.append("`train_dataset` is empty; pass at least one training example.")
    seeds = [int(s) for s in seeds if int(s) != seed]
    if seed_methods is not None:
        unknown = sorted(set(seed_methods) - set(methods) - {"base", "full"})
        if unknown:
            problems.append(f"`seed_methods` names methods that are not compared: {unknown}.")
    if problems:
        raise CoFiTuneError("Invalid compare_methods arguments:\n  - " + "\n  - ".join(problems))
    splits = {"validation": _as_split(validation, "validation"), "test": _as_split(test, "test")}
    _check_disjoint(splits["validation"], splits["test"], train_dataset)
    resolved = resolve_methods(methods, learning_rates)
    settings = settings or MethodSettings()
    settings = replace(
        settings,
        tokenizer=settings.tokenizer or tokenizer,
        micro_batches=gradient_accumulation_steps,
        cache_dir=settings.cache_dir or os.path.join(output_dir, "cache"),
        max_length=max_length,
    )
    train_kwargs = {
        "steps": steps,
        "batch_size": batch_size,
        "max_length": max_length,
        "gradient_accumulation_steps": gradient_accumulation_steps,
    }
    run = _Comparison(model_loader, train_dataset, tokenizer, splits, resolved, settings, train_kwargs, output_dir,
                      progress)  # fmt: skip
    run.save_adapters = frozenset(save_adapters)
    run.check_settings()
    if not report_only:
        run.prepare(seed, importance_kwargs or {})
        run.run_jobs(run.grid_points(seed), desc="compare")
    result = ComparisonResult(run.records(), resolved, seed=seed, weight=weight)
    if seeds and not report_only:
        chosen: dict[str, list] = {}
        for name, row in result.selected.items():
            if seed_methods is not None and name not in seed_methods:
                continue
            chosen.setdefault(name, []).append((name, row["learning_rate"], row.get("alpha")))
        jobs = [job for s in seeds for job in run.grid_points(s, only=chosen)]
        run.run_jobs(jobs, desc="seeds", splits=("test",))  # a repeat's validation scores would choose nothing
        result = ComparisonResult(run.records(), resolved, seed=seed, weight=weight)
    write_json_atomic(os.path.join(output_dir, "comparison.json"), result.to_dict())
    with open(os.path.join(output_dir, "comparison.md"), "w") as fh:
        fh.write(result.to_markdown() + "\n")
    result.plot(os.path.join(output_dir, "comparison.png"))
    return result
