"""The coarse search itself: the candidate windows of each level, and `search_layers`, which trains and scores them.

Level 1 tries `paper_windows(N)` with the FFN, level 2 other modules in the best windows, level 3 `refine_windows` of
the best candidate; the base model and a full fine-tuning reference are scored first, by the same evaluators. Each
result is written as JSON as soon as it is known, with a hash of the run's settings: re-running the same search skips
the finished candidates, and a search with other settings refuses to mix its results with them.
"""

from __future__ import annotations

import gc
import glob
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from cofitune_peft import CoFiTuneConfig
from cofitune_peft import CoFiTuneError
from ..evaluation import SpecialityEval, VersatilityEval
from ..training import train_sft
from .result import SearchResult, _write_json

logger = logging.getLogger(__name__)

LEVELS = ("window", "module", "refine")
MODULES = ("ffn", "mha", "ffn+mha")


def paper_windows(num_layers: int) -> list[tuple[int, int]]:
    """The paper's candidate windows for N layers: quarters, then halves `[0,N/2)`, `[N/4,3N/4)`, `[N/2,N)`.

    Example:

    ```python
    >>> paper_windows(30)
    [(0, 7), (7, 15), (15, 22), (22, 30), (0, 15), (7, 22), (15, 30)]
    ```
    """
    q = [i * num_layers // 4 for i in range(5)]
    windows = [(q[0], q[1]), (q[1], q[2]), (q[2], q[3]), (q[3], q[4]), (q[0], q[2]), (q[1], q[3]), (q[2], q[4])]
    return list(dict.fromkeys(w for w in windows if w[0] < w[1]))


def refine_windows(window: tuple[int, int], num_layers: int) -> list[tuple[int, int]]:
    """Neighbours of `window`: shifted down and up by `s = max(1, round(N/8))`, shrunk and grown by `h = max(1, s//2)`
    per edge (growing stops at the model's ends; neighbours outside the model or empty are dropped).

    Example:

    ```python
    >>> refine_windows((7, 15), 30)
    [(3, 11), (11, 19), (9, 13), (5, 17)]
    ```
    """
    a, b = window
    s = max(1, round(num_layers / 8))
    h = max(1, s // 2)
    candidates = [(a - s, b - s), (a + s, b + s), (a + h, b - h), (max(0, a - h), min(num_layers, b + h))]
    return list(dict.fromkeys((x, y) for x, y in candidates if 0 <= x < y <= num_layers and (x, y) != (a, b)))


def candidate_key(window: tuple[int, int], modules: str) -> str:
    return f"L{window[0]}-{window[1]}_{modules.replace('+', '-')}"


def _num_layers(model) -> int:
    from cofitune_peft.architectures import count_layers, spec_for, text_config

    try:
        found = count_layers(model, spec_for(model).layers_pattern)
        if found:
            return found
    except CoFiTuneError:
        pass
    n = getattr(text_config(model.config), "num_hidden_layers", None)
    if not n:
        raise CoFiTuneError("cannot tell how many decoder layers the model has; it needs `config.num_hidden_layers`.")
    return int(n)


def _save_reference(versatility, path: str) -> None:
    if hasattr(versatility, "reference_state"):
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(versatility.reference_state(), tmp)
        os.replace(tmp, path)


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _evaluate(evaluator, model, tokenizer) -> tuple[float, dict]:
    out = evaluator.evaluate(model, tokenizer) if hasattr(evaluator, "evaluate") else evaluator(model, tokenizer)
    if isinstance(out, Mapping):
        return float(out["score"]), dict(out)
    return float(out), {}


def _as_speciality(speciality, tokenizer):
    if isinstance(speciality, Sequence) and not isinstance(speciality, str):
        items = list(speciality)
        if not items:
            raise CoFiTuneError("the `speciality` eval set is empty; pass at least one example.")
        if all("options" in x for x in items):
            return SpecialityEval.multiple_choice(items, tokenizer=tokenizer)
        return SpecialityEval.exact_match(items, tokenizer=tokenizer)
    if not callable(speciality):
        raise CoFiTuneError(
            f"`speciality` must be an evaluator, a callable or a list of examples, got {speciality!r}."
        )
    return speciality


def _as_versatility(versatility, tokenizer):
    if isinstance(versatility, Sequence) and not isinstance(versatility, str):
        items = list(versatility)
        if not items:
            raise CoFiTuneError("the `versatility` eval set is empty; pass general texts, probes or an evaluator.")
        texts = [x for x in items if isinstance(x, str)]
        return VersatilityEval.default(texts, [x for x in items if not isinstance(x, str)], tokenizer=tokenizer)
    if not callable(versatility):
        raise CoFiTuneError(f"`versatility` must be an evaluator, a callable or a list, got {versatility!r}.")
    return versatility


def _load_full_reference(full_reference) -> dict:
    if isinstance(full_reference, SearchResult):
        full_reference = full_reference._get("full")
    elif isinstance(full_reference, (str, os.PathLike)):
        path = os.fspath(full_reference)
        path = os.path.join(path, "candidates", "full.json") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise CoFiTuneError(f"`full_reference` {path!r} does not exist; pass a search directory or its full.json.")
        with open(path) as fh:
            full_reference = json.load(fh)
    if not isinstance(full_reference, Mapping) or "speciality" not in full_reference:
        raise CoFiTuneError(
            "`full_reference` must be a dict with `speciality` (and `versatility`), a search directory or a "
            f"SearchResult, got {full_reference!r}."
        )
    return {"speciality": float(full_reference["speciality"]), "versatility": full_reference.get("versatility")}


def search_layers(
    model_loader: Callable[[], Any],
    train_dataset: Sequence[Mapping[str, Any]],
    speciality,
    versatility,
    *,
    tokenizer,
    budget_steps: int,
    output_dir: str,
    learning_rate: float = 1e-4,
    full_ft_learning_rate: float = 2e-5,
    windows: Sequence[tuple[int, int]] | None = None,
    levels: Sequence[str] = LEVELS,
    width: int = 2,
    seed: int = 0,
    full_reference=None,
    progress: bool = True,
    weight: float = 0.5,
    batch_size: int = 8,
    max_length: int = 256,
) -> SearchResult:
    """Search the layer window and modules of CoFiTune's coarse level by short, identical fine-tunes.

    Args:
        model_loader (`Callable[[], PreTrainedModel]`): returns a fresh base model each call (a `(model, tokenizer)`
            pair is accepted too). Called once for the base model's scores and once per trained candidate.
        train_dataset (`Sequence[Mapping]`): training examples (see `train_sft`).
        speciality: a `SpecialityEval`, any `f(model, tokenizer) -> float | {"score": ...}`, or a list of examples
            (exact match, or multiple choice when every item has `options`).
        versatility: a `VersatilityEval` (prepared on the base model by the search), any callable as above (its
            score is divided by the base model's), or a list of general texts and probe dicts.
        tokenizer: the tokenizer of the model.
        budget_steps (`int`): optimizer steps of every fine-tune (candidates and full fine-tuning alike).
        output_dir (`str`): where results go: `settings.json`, `candidates/<key>.json`, `search.json`.
        learning_rate (`float`, *optional*, defaults to 1e-4): CoFiTune candidates' learning rate.
        full_ft_learning_rate (`float`, *optional*, defaults to 2e-5): the full fine-tuning reference's.
        windows (`Sequence[tuple[int, int]]`, *optional*): level-1 windows (0-based `[a, b)`) instead of
            `paper_windows(N)`.
        levels (`Sequence[str]`, *optional*, defaults to `("window", "module", "refine")`): levels to run;
            `"window"` is required, the others refine its ranking.
        width (`int`, *optional*, defaults to 2): level-1 windows that level 2 tries other modules in.
        seed (`int`, *optional*, defaults to 0): data order and dropout, the same for every candidate.
        full_reference (*optional*): a precomputed full fine-tuning result (`{"speciality": x, "versatility": y}`
            with raw scores of the same evaluators, a search directory, or a `SearchResult`) to skip that run.
        progress (`bool`, *optional*, defaults to `True`): tqdm bars inside training and evaluation.
        weight (`float`, *optional*, defaults to 0.5): Spec.'s weight in Uni.
        batch_size (`int`, *optional*, defaults to 8): training batch per step.
        max_length (`int`, *optional*, defaults to 256): training tokens per example.

    Returns:
        `SearchResult`: also written to `output_dir/search.json`. Re-running with the same arguments skips every
        finished candidate; arguments that change training or scoring raise `CoFiTuneError` instead of mixing results.
    """
    problems = []
    if not isinstance(budget_steps, int) or isinstance(budget_steps, bool) or budget_steps <= 0:
        problems.append(f"`budget_steps` must be a positive int, got {budget_steps!r}.")
    levels = tuple(levels)
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown or not levels:
        problems.append(f"`levels` must be a non-empty subset of {LEVELS}, got {levels!r} (unknown: {unknown}).")
    elif "window" not in levels:
        problems.append(f"`levels` must include 'window': the other levels refine its ranking; got {levels!r}.")
    if not isinstance(width, int) or width < 1:
        problems.append(f"`width` must be a positive int, got {width!r}.")
    train_dataset = list(train_dataset)
    if not train_dataset:
        problems.append("`train_dataset` is empty; pass at least one training example.")
    if not 0.0 <= weight <= 1.0:
        problems.append(f"`weight` must lie in [0, 1], got {weight!r}.")
    if problems:
        raise CoFiTuneError("Invalid search_layers arguments:\n  - " + "\n  - ".join(problems))
    speciality = _as_speciality(speciality, tokenizer)
    versatility = _as_versatility(versatility, tokenizer)
    full = _load_full_reference(full_reference) if full_reference is not None else None

    def load():
        loaded = model_loader()
        return loaded[0] if isinstance(loaded, tuple) else loaded

    cand_dir = os.path.join(output_dir, "candidates")
    os.makedirs(cand_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(cand_dir, "*.tmp*")):
        os.remove(stale)  # a candidate that was in flight when the last run stopped
    run_settings = {
        "budget_steps": budget_steps,
        "learning_rate": learning_rate,
        "full_ft_learning_rate": full_ft_learning_rate,
        "seed": seed,
        "batch_size": batch_size,
        "max_length": max_length,
        "train": _hash(train_dataset),
        "speciality": getattr(speciality, "fingerprint", None),
        "versatility": getattr(versatility, "fingerprint", None),
        "full_reference": full,
    }
    settings_key = _hash(run_settings)
    records: dict[str, dict] = {}
    for path in glob.glob(os.path.join(cand_dir, "*.json")):
        with open(path) as fh:
            record = json.load(fh)
        if record.get("settings_key") != settings_key:
            raise CoFiTuneError(
                f"{output_dir!r} holds results of a search with other settings ({os.path.basename(path)}); use a new "
                "`output_dir`, or delete the old one, rather than mix budgets, learning rates, data or evals."
            )
        records[record["key"]] = record
    base_model = None
    settings_path = os.path.join(output_dir, "settings.json")
    old = {}
    if os.path.isfile(settings_path):
        with open(settings_path) as fh:
            old = json.load(fh)
    if old.get("settings_key") == settings_key and "num_layers" in old:
        num_layers = old["num_layers"]  # resuming: no need to load the base model just to count its layers
    else:
        base_model = load()
        num_layers = _num_layers(base_model)
    windows = [tuple(w) for w in windows] if windows is not None else paper_windows(num_layers)
    bad = [w for w in windows if len(w) != 2 or not 0 <= w[0] < w[1] <= num_layers]
    if bad or not windows:
        raise CoFiTuneError(
            f"`windows` must be non-empty (a, b) pairs with 0 <= a < b <= {num_layers} for this model ({num_layers} "
            f"decoder layers; (a, b) trains layers a..b-1), got {bad or windows}."
        )
    settings = {**run_settings, "settings_key": settings_key, "num_layers": num_layers, "weight": weight}
    settings.update(levels=list(levels), width=width, windows=[list(w) for w in windows])
    _write_json(settings_path, settings)
    state = {"order": len(records), "reference_ready": False}

    def result() -> SearchResult:
        return SearchResult(sorted(records.values(), key=lambda r: r["order"]), weight, output_dir)

    def ensure_reference():
        if state["reference_ready"] or not hasattr(versatility, "prepare"):
            return
        ref_path = os.path.join(output_dir, "versatility_reference.pt")
        if getattr(versatility, "reference", None) is not None and not os.path.isfile(ref_path):
            # prepared by the caller (`base_model=`): keep it, and save it for a resumed run
            _save_reference(versatility, ref_path)
            state["reference_ready"] = True
            return
        if os.path.isfile(ref_path) and hasattr(versatility, "load_reference_state"):
            try:
                versatility.load_reference_state(torch.load(ref_path, weights_only=False))
                state["reference_ready"] = True
                return
            except CoFiTuneError:
                logger.info("the saved versatility reference does not match the evaluator; recomputing it.")
        nonlocal base_model
        model = base_model if base_model is not None else load()
        versatility.prepare(model, tokenizer)
        _save_reference(versatility, ref_path)
        state["reference_ready"] = True

    def run(key: str, kind: str, level: str, window=None, modules=None, parent=None) -> dict:
        if key in records:
            logger.info("[%s] %s: cached", level, key)
            return records[key]
        nonlocal base_model
        start = time.perf_counter()
        if kind == "full" and full is not None:
            record = {"speciality": full["speciality"], "versatility": full["versatility"], "given": True}
            train_stats, train_seconds = None, 0.0
        else:
            ensure_reference()
            model = base_model if kind == "base" and base_model is not None else load()
            base_model = None  # a base model is used once (trained in place or evaluated), then freed
            train_stats, train_seconds = None, 0.0
            if kind == "full":
                model.requires_grad_(True)
                train_stats = train_sft(
                    model,
                    train_dataset,
                    tokenizer=tokenizer,
                    steps=budget_steps,
                    learning_rate=full_ft_learning_rate,
                    batch_size=batch_size,
                    max_length=max_length,
                    seed=seed,
                    progress=progress,
                )
            elif kind == "cofitune":
                from peft import get_peft_model

                torch.manual_seed(seed)
                model = get_peft_model(model, CoFiTuneConfig(layers=tuple(window), target_modules=modules))
                train_stats = train_sft(
                    model,
                    train_dataset,
                    tokenizer=tokenizer,
                    steps=budget_steps,
                    learning_rate=learning_rate,
                    batch_size=batch_size,
                    max_length=max_length,
                    seed=seed,
                    progress=progress,
                )
            if train_stats is not None:
                train_seconds = train_stats["seconds"]
            s_score, s_details = _evaluate(speciality, model, tokenizer)
            v_score, v_details = _evaluate(versatility, model, tokenizer)
            record = {"speciality": s_score, "versatility": v_score}
            record.update(speciality_details=s_details, versatility_details=v_details)
            big = sum(p.numel() for p in model.parameters()) > 10_000_000
            del model
            if big:  # PEFT wrappers hold reference cycles: free a real model's memory before loading the next one
                gc.collect()
        record.update(key=key, kind=kind, level=level, window=list(window) if window else None, modules=modules)
        record.update(parent=parent, order=state["order"], settings_key=settings_key, train=train_stats)
        record.update(seconds={"train": train_seconds, "total": time.perf_counter() - start})
        record["cost_seconds"] = record["seconds"]["total"]
        state["order"] += 1
        _write_json(os.path.join(cand_dir, f"{key}.json"), record)
        records[key] = record
        if kind == "cofitune":
            s = result().scores(record)
            logger.info(
                "[%s] %s: Spec. %.3f  Vers. %.3f  Uni. %.3f  (%.0f s)",
                level,
                key,
                s["Spec."],
                s["Vers."],
                s["Uni."],
                record["cost_seconds"],
            )
        else:
            logger.info(
                "[%s] %s: speciality %.4f, versatility %.4f (%.0f s)",
                level,
                key,
                record["speciality"],
                record["versatility"] if record["versatility"] is not None else float("nan"),
                record["cost_seconds"],
            )
        return record

    run("base", "base", "reference")
    full_record = run("full", "full", "reference")
    base_record = records["base"]
    if abs(full_record["speciality"] - base_record["speciality"]) < 1e-12:
        logger.warning(
            "full fine-tuning did not change the speciality score (%.4f): Spec. and Uni. are undefined and candidates "
            "rank by raw speciality; raise `budget_steps` or `full_ft_learning_rate`.",
            base_record["speciality"],
        )
    elif full_record["speciality"] < base_record["speciality"]:
        logger.warning("full fine-tuning lowered the speciality score: Spec. has its sign flipped; check the setup.")

    for window in windows:
        run(candidate_key(window, "ffn"), "cofitune", "window", window, "ffn")
    if "module" in levels:
        for top in result().ranked("window")[:width]:
            for modules in MODULES[1:]:
                run(candidate_key(top["window"], modules), "cofitune", "module", top["window"], modules, top["key"])
    if "refine" in levels:
        best = result().best
        for window in refine_windows(tuple(best["window"]), num_layers):
            run(candidate_key(window, best["modules"]), "cofitune", "refine", window, best["modules"], best["key"])
    final = result()
    final.save()
    logger.info("best: layers %s, modules %s", tuple(final.best["window"]), final.best["modules"])
    return final
