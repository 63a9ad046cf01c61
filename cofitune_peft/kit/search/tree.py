"""The coarse search itself: the candidate windows of each level, and `LayerSearch`, which trains and scores them.

Level 1 tries `paper_windows(N)` with the FFN, level 2 other modules in the best windows, level 3 `refine_windows` of
the best candidate; the base model and a full fine-tuning reference are scored first, by the same evaluators. Each
result is written as JSON as soon as it is known, with a fingerprint of the run's settings: re-running the same search
skips the finished candidates, and a search with other settings refuses to mix its results with them.
`search_layers` is the one-call form: it builds a `LayerSearch` and runs it.
"""

from __future__ import annotations

import gc
import glob
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from cofitune_peft import CoFiTuneConfig, CoFiTuneError
from cofitune_peft.utils import write_json_atomic

from ..evaluation import VersatilityEval
from ..evaluation.speciality import speciality_for_examples
from ..fingerprint import fingerprint
from ..state_file import legacy_pickle_error, load_state, save_state
from ..training import train_sft
from .result import SearchResult

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


def _num_layers(model, layers_pattern: str | None = None) -> int:
    from cofitune_peft.architectures import find_decoder_layers, text_config

    try:
        found = len(find_decoder_layers(model, layers_pattern)[1])
        if found:
            return found
    except CoFiTuneError:
        pass
    n = getattr(text_config(model.config), "num_hidden_layers", None)
    if not n:
        raise CoFiTuneError("cannot tell how many decoder layers the model has; it needs `config.num_hidden_layers`.")
    return int(n)


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
        return speciality_for_examples(items, tokenizer=tokenizer)
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


def _save_reference(versatility, path: str) -> None:
    if hasattr(versatility, "reference_state"):
        save_state(versatility.reference_state(), path)


def _argument_problems(budget_steps, levels: tuple, width, train_dataset: list, weight) -> list[str]:
    problems = []
    if not isinstance(budget_steps, int) or isinstance(budget_steps, bool) or budget_steps <= 0:
        problems.append(f"`budget_steps` must be a positive int, got {budget_steps!r}.")
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown or not levels:
        problems.append(f"`levels` must be a non-empty subset of {LEVELS}, got {levels!r} (unknown: {unknown}).")
    elif "window" not in levels:
        problems.append(f"`levels` must include 'window': the other levels refine its ranking; got {levels!r}.")
    if not isinstance(width, int) or width < 1:
        problems.append(f"`width` must be a positive int, got {width!r}.")
    if not train_dataset:
        problems.append("`train_dataset` is empty; pass at least one training example.")
    if not 0.0 <= weight <= 1.0:
        problems.append(f"`weight` must lie in [0, 1], got {weight!r}.")
    return problems


class LayerSearch:
    """CoFiTune's coarse search, step by step: the arguments are those of `search_layers` (see there).

    Building one checks the arguments and touches nothing; `run()` opens (or resumes) the cache in `output_dir`,
    scores the base model and the full fine-tuning reference, walks the levels and returns the `SearchResult`.
    The state lives in plain attributes: `records` (finished results by candidate key, the cache), `full_reference`
    (a given full fine-tuning result, or `None` to train one), `settings` and `settings_key` (what keys the cache),
    and, once `run()` has started, `num_layers` and `windows`.

    Example:

    ```python
    from cofitune_peft.kit.loading import load_model
    from cofitune_peft.kit.search import LayerSearch

    _, tok = load_model("smollm2")
    search = LayerSearch(lambda: load_model("smollm2")[0], train, speciality, versatility, tokenizer=tok,
                         budget_steps=100, output_dir="runs/search")
    result = search.run()  # run it again, here or in a new process, to resume
    print(result.best_config)
    ```
    """

    def __init__(
        self,
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
        unit_map: dict[str, str] | None = None,
        layers_pattern: str | None = None,
    ):
        self.levels, self.train_dataset = tuple(levels), list(train_dataset)
        self.unit_map, self.layers_pattern = unit_map, layers_pattern
        problems = _argument_problems(budget_steps, self.levels, width, self.train_dataset, weight)
        if problems:
            raise CoFiTuneError("Invalid search_layers arguments:\n  - " + "\n  - ".join(problems))
        self.model_loader, self.tokenizer = model_loader, tokenizer
        self.speciality = _as_speciality(speciality, tokenizer)
        self.versatility = _as_versatility(versatility, tokenizer)
        self.full_reference = _load_full_reference(full_reference) if full_reference is not None else None
        self.budget_steps, self.learning_rate = budget_steps, learning_rate
        self.full_ft_learning_rate = full_ft_learning_rate
        self.seed, self.batch_size, self.max_length, self.progress = seed, batch_size, max_length, progress
        self.width, self.weight, self.output_dir = width, weight, output_dir
        self.candidates_dir = os.path.join(output_dir, "candidates")
        self.requested_windows = None if windows is None else [tuple(w) for w in windows]
        self.settings = {
            "budget_steps": budget_steps,
            "learning_rate": learning_rate,
            "full_ft_learning_rate": full_ft_learning_rate,
            "seed": seed,
            "batch_size": batch_size,
            "max_length": max_length,
            "train": fingerprint(self.train_dataset),
            "speciality": getattr(self.speciality, "fingerprint", None),
            "versatility": getattr(self.versatility, "fingerprint", None),
            "full_reference": self.full_reference,
        }
        if unit_map is not None or layers_pattern is not None:  # (absent otherwise: earlier caches keep their keys)
            self.settings.update(unit_map=unit_map, layers_pattern=layers_pattern)
        self.settings_key = fingerprint(self.settings)
        self.records: dict[str, dict] = {}
        self.num_layers: int | None = None
        self.windows: list[tuple[int, int]] | None = None
        self._base_model = None  # loaded to count layers; handed to the first run that needs a base model
        self._reference_ready = False

    # ------------------------------------------------------------------ the walk

    def run(self) -> SearchResult:
        """Run (or resume) the search: references, then each level in `levels`; returns and saves the result."""
        self._open_cache()
        self._resolve_windows()
        self._score_references()
        for window in self.windows:
            self._candidate(window, "ffn", "window")
        if "module" in self.levels:
            for top in self.result().ranked("window")[: self.width]:
                for modules in MODULES[1:]:
                    self._candidate(top["window"], modules, "module", parent=top["key"])
        if "refine" in self.levels:
            best = self.result().best
            for window in refine_windows(tuple(best["window"]), self.num_layers):
                self._candidate(window, best["modules"], "refine", parent=best["key"])
        final = self.result()
        final.save()
        logger.info("best: layers %s, modules %s", tuple(final.best["window"]), final.best["modules"])
        return final

    def result(self) -> SearchResult:
        """The records finished so far, in the order they were run, as a `SearchResult`."""
        return SearchResult(sorted(self.records.values(), key=lambda r: r["order"]), self.weight, self.output_dir)

    def _candidate(self, window, modules: str, level: str, parent: str | None = None) -> dict:
        """Train and score CoFiTune on `window` x `modules` (or return its cached record)."""
        return self._run(candidate_key(window, modules), "cofitune", level, tuple(window), modules, parent)

    def _score_references(self) -> None:
        base = self._run("base", "base", "reference")
        full = self._run("full", "full", "reference")
        if abs(full["speciality"] - base["speciality"]) < 1e-12:
            logger.warning(
                "full fine-tuning did not change the speciality score (%.4f): Spec. and Uni. are undefined and "
                "candidates rank by raw speciality; raise `budget_steps` or `full_ft_learning_rate`.",
                base["speciality"],
            )
        elif full["speciality"] < base["speciality"]:
            logger.warning(
                "full fine-tuning lowered the speciality score: Spec. has its sign flipped; check the setup."
            )

    # ------------------------------------------------------------------ the cache

    def _open_cache(self) -> None:
        """Read the finished records of `output_dir`, refusing those of a search with other settings."""
        os.makedirs(self.candidates_dir, exist_ok=True)
        # files in flight when the last run was killed (`*.tmp*`: as earlier versions named them)
        patterns = [(self.output_dir, ".*.tmp-*"), (self.candidates_dir, ".*.tmp-*"), (self.candidates_dir, "*.tmp*")]
        for folder, pattern in patterns:
            for stale in glob.glob(os.path.join(folder, pattern)):
                os.remove(stale)
        self.records = {}
        for path in glob.glob(os.path.join(self.candidates_dir, "*.json")):
            with open(path) as fh:
                record = json.load(fh)
            if record.get("settings_key") != self.settings_key:
                raise CoFiTuneError(
                    f"{self.output_dir!r} holds results of a search with other settings ({os.path.basename(path)}); "
                    "use a new `output_dir`, or delete the old one, rather than mix budgets, learning rates, data or "
                    "evals."
                )
            self.records[record["key"]] = record

    def _resolve_windows(self) -> None:
        """Count the model's layers (from `settings.json` when resuming), check the windows, write `settings.json`."""
        settings_path = os.path.join(self.output_dir, "settings.json")
        old = {}
        if os.path.isfile(settings_path):
            with open(settings_path) as fh:
                old = json.load(fh)
        if old.get("settings_key") == self.settings_key and "num_layers" in old:
            self.num_layers = old["num_layers"]  # resuming: no need to load the base model just to count its layers
        else:
            self._base_model = self._load()
            self.num_layers = _num_layers(self._base_model, self.layers_pattern)
        n = self.num_layers
        windows = self.requested_windows if self.requested_windows is not None else paper_windows(n)
        bad = [w for w in windows if len(w) != 2 or not 0 <= w[0] < w[1] <= n]
        if bad or not windows:
            raise CoFiTuneError(
                f"`windows` must be non-empty (a, b) pairs with 0 <= a < b <= {n} for this model ({n} decoder "
                f"layers; (a, b) trains layers a..b-1), got {bad or windows}."
            )
        self.windows = windows
        settings = {**self.settings, "settings_key": self.settings_key, "num_layers": n, "weight": self.weight}
        settings.update(levels=list(self.levels), width=self.width, windows=[list(w) for w in windows])
        write_json_atomic(settings_path, settings)

    def _store(self, record: dict) -> None:
        write_json_atomic(os.path.join(self.candidates_dir, f"{record['key']}.json"), record)
        self.records[record["key"]] = record

    # ------------------------------------------------------------------ one candidate

    def _run(self, key: str, kind: str, level: str, window=None, modules=None, parent=None) -> dict:
        if key in self.records:
            logger.info("[%s] %s: cached", level, key)
            return self.records[key]
        start = time.perf_counter()
        if kind == "full" and self.full_reference is not None:
            record = {**self.full_reference, "given": True}
            train_stats = None
        else:
            record, train_stats = self._train_and_score(kind, window, modules)
        record.update(key=key, kind=kind, level=level, window=list(window) if window else None, modules=modules)
        record.update(parent=parent, order=len(self.records), settings_key=self.settings_key, train=train_stats)
        train_seconds = train_stats["seconds"] if train_stats is not None else 0.0
        record.update(seconds={"train": train_seconds, "total": time.perf_counter() - start})
        record["cost_seconds"] = record["seconds"]["total"]
        self._store(record)
        self._log(record)
        return record

    def _train_and_score(self, kind: str, window, modules) -> tuple[dict, dict | None]:
        self._ensure_versatility_reference()
        model = self._base_model if kind == "base" and self._base_model is not None else self._load()
        self._base_model = None  # a base model is used once (trained in place or evaluated), then freed
        train_stats = None
        if kind == "full":
            model.requires_grad_(True)
            train_stats = self._train(model, self.full_ft_learning_rate)
        elif kind == "cofitune":
            from peft import get_peft_model

            torch.manual_seed(self.seed)
            config = CoFiTuneConfig(
                layers=tuple(window), parts=modules, unit_map=self.unit_map, layers_pattern=self.layers_pattern
            )
            model = get_peft_model(model, config)
            train_stats = self._train(model, self.learning_rate)
        s_score, s_details = _evaluate(self.speciality, model, self.tokenizer)
        v_score, v_details = _evaluate(self.versatility, model, self.tokenizer)
        record = {"speciality": s_score, "versatility": v_score}
        record.update(speciality_details=s_details, versatility_details=v_details)
        big = sum(p.numel() for p in model.parameters()) > 10_000_000
        del model
        if big:  # PEFT wrappers hold reference cycles: free a real model's memory before loading the next one
            gc.collect()
        return record, train_stats

    def _train(self, model, learning_rate: float) -> dict:
        return train_sft(
            model,
            self.train_dataset,
            tokenizer=self.tokenizer,
            steps=self.budget_steps,
            learning_rate=learning_rate,
            batch_size=self.batch_size,
            max_length=self.max_length,
            seed=self.seed,
            progress=self.progress,
        )

    def _log(self, record: dict) -> None:
        level, key, cost = record["level"], record["key"], record["cost_seconds"]
        if record["kind"] == "cofitune":
            s = self.result().scores(record)
            logger.info(
                "[%s] %s: Spec. %.3f  Vers. %.3f  Uni. %.3f  (%.0f s)",
                level,
                key,
                s["Spec."],
                s["Vers."],
                s["Uni."],
                cost,
            )
        else:
            versatility = record["versatility"] if record["versatility"] is not None else float("nan")
            logger.info(
                "[%s] %s: speciality %.4f, versatility %.4f (%.0f s)",
                level,
                key,
                record["speciality"],
                versatility,
                cost,
            )

    # ------------------------------------------------------------------ models and the versatility reference

    def _load(self):
        loaded = self.model_loader()
        return loaded[0] if isinstance(loaded, tuple) else loaded

    def _ensure_versatility_reference(self) -> None:
        """Prepare the versatility evaluator on the base model once: from the caller, from disk, or computed."""
        versatility = self.versatility
        if self._reference_ready or not hasattr(versatility, "prepare"):
            return
        legacy = os.path.join(self.output_dir, "versatility_reference.pt")
        if os.path.isfile(legacy):
            raise legacy_pickle_error(legacy, "search's versatility reference")
        ref_path = os.path.join(self.output_dir, "versatility_reference.safetensors")
        if getattr(versatility, "reference", None) is not None and not os.path.isfile(ref_path):
            # prepared by the caller (`base_model=`): keep it, and save it for a resumed run
            _save_reference(versatility, ref_path)
            self._reference_ready = True
            return
        if os.path.isfile(ref_path) and hasattr(versatility, "load_reference_state"):
            state = load_state(ref_path)  # refuses, by name, any file it did not write
            try:
                versatility.load_reference_state(state)
                self._reference_ready = True
                return
            except CoFiTuneError:
                logger.info("the saved versatility reference does not match the evaluator; recomputing it.")
        model = self._base_model if self._base_model is not None else self._load()
        versatility.prepare(model, self.tokenizer)
        _save_reference(versatility, ref_path)
        self._reference_ready = True


def search_layers(model_loader, train_dataset, speciality, versatility, **options) -> SearchResult:
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
        unit_map (`dict[str, str]`, *optional*): the layers described as `CoFiTuneConfig.unit_map` does, for models
            whose layers CoFiTune cannot read by itself.
        layers_pattern (`str`, *optional*): the decoder-layer list, as `CoFiTuneConfig.layers_pattern`.

    Returns:
        `SearchResult`: also written to `output_dir/search.json`. Re-running with the same arguments skips every
        finished candidate; arguments that change training or scoring raise `CoFiTuneError` instead of mixing results.

    `LayerSearch` is the same search as an object (its state in attributes, `run()` to start or resume it).
    """
    return LayerSearch(model_loader, train_dataset, speciality, versatility, **options).run()


# `search_layers` takes exactly `LayerSearch`'s arguments: show them in `help()` and `inspect.signature`.
search_layers.__signature__ = inspect.signature(LayerSearch).replace(return_annotation=SearchResult)
