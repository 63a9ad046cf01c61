"""The coarse level of CoFiTune (arXiv 2404.10306): a budgeted tree search over layer windows and modules.

The paper picks the trained (window, module) by an "empirical tree search" and released no code for it. Here:

1. `window`: the paper's seven windows for N layers (quarters and halves) with the FFN;
2. `module`: in the best `width` windows, MHA and FFN+MHA as well;
3. `refine`: the best candidate's window shifted down/up, shrunk and grown by ~N/8.

Every candidate trains a fresh model with the same data, steps, batch and seed (`train_sft`), and is scored by
Spec., Vers. and Uni. (`cofitune_peft.evaluation`) against the base model and a full fine-tuning reference. Results
are written per candidate as JSON (atomically), so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import CoFiTuneConfig
from .errors import CoFiTuneError
from .evaluation import SpecialityEval, VersatilityEval, speciality_score, unified_score, versatility_score
from .training import train_sft

logger = logging.getLogger(__name__)

LEVELS = ("window", "module", "refine")
MODULES = ("ffn", "mha", "ffn+mha")
TABLE_COLUMNS = ["window", "modules", "Spec.", "Vers.", "Uni.", "cost (s)", "level", "speciality", "versatility"]


# ------------------------------------------------------------------ the tree


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
    from .architectures import count_layers, spec_for, text_config

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


# ------------------------------------------------------------------ the result


@dataclass
class SearchResult:
    """What a search found: one record per candidate, the base model and the full fine-tuning reference.

    Args:
        records (`list[dict]`): raw per-candidate results, as stored in `output_dir/candidates/*.json`.
        weight (`float`, *optional*, defaults to 0.5): weight `w` of Spec. in `Uni. = w*Spec. + (1-w)*Vers.`.
        output_dir (`str`, *optional*): where the search lives.
    """

    records: list[dict]
    weight: float = 0.5
    output_dir: str | None = None

    def _get(self, kind: str) -> dict | None:
        return next((r for r in self.records if r["kind"] == kind), None)

    def scores(self, record: Mapping[str, Any]) -> dict[str, float]:
        """Spec., Vers., Uni. of one record (NaN where undefined, e.g. full fine-tuning gained nothing)."""
        base, full = self._get("base"), self._get("full")
        nan = float("nan")
        spec = vers = nan
        if base is not None and full is not None:
            with contextlib.suppress(CoFiTuneError):
                spec = speciality_score(record["speciality"], base["speciality"], full["speciality"])
        versatility = record.get("versatility")
        if base is not None and versatility is not None:
            with contextlib.suppress(CoFiTuneError):
                vers = versatility_score(versatility, base["versatility"])
        return {"Spec.": spec, "Vers.": vers, "Uni.": unified_score(spec, vers, self.weight)}

    @property
    def table(self):
        """A pandas DataFrame, one row per candidate (base and full first), indexed by candidate key."""
        import pandas as pd

        rows = []
        for r in self.records:
            window = (
                "all"
                if r["kind"] == "full"
                else "-"
                if r["kind"] == "base"
                else f"[{r['window'][0]}, {r['window'][1]})"
            )
            rows.append(
                {
                    "key": r["key"],
                    "window": window,
                    "modules": r.get("modules") or "-",
                    **self.scores(r),
                    "cost (s)": r.get("cost_seconds", 0.0),
                    "level": r["level"],
                    "speciality": r["speciality"],
                    "versatility": r.get("versatility", float("nan")),
                }
            )
        return pd.DataFrame(rows, columns=["key", *TABLE_COLUMNS]).set_index("key")

    def candidates(self) -> list[dict]:
        return [r for r in self.records if r["kind"] == "cofitune"]

    def _rank_key(self, record: Mapping[str, Any]) -> tuple:
        uni = self.scores(record)["Uni."]
        width = record["window"][1] - record["window"][0]
        # Undefined Uni. (full fine-tuning gained nothing) falls back to raw speciality, then versatility.
        finite = 0 if math.isnan(uni) else 1
        return (finite, uni if finite else 0.0, record["speciality"], record.get("versatility") or 0.0, -width)

    def ranked(self, level: str | None = None) -> list[dict]:
        """CoFiTune candidates (of `level`, or all), best first by Uni. (ties: the narrower window)."""
        pool = [r for r in self.candidates() if level is None or r["level"] == level]
        return sorted(pool, key=self._rank_key, reverse=True)

    @property
    def best(self) -> dict:
        ranked = self.ranked()
        if not ranked:
            raise CoFiTuneError("the search has no finished CoFiTune candidate yet.")
        return ranked[0]

    @property
    def best_config(self) -> CoFiTuneConfig:
        """The best candidate as a `CoFiTuneConfig` (no importance: add it for the fine level)."""
        best = self.best
        return CoFiTuneConfig(layers=tuple(best["window"]), target_modules=best["modules"])

    def with_weight(self, weight: float) -> SearchResult:
        """The same records scored with another Spec. weight."""
        unified_score(0.0, 0.0, weight)  # validates
        return SearchResult(self.records, weight, self.output_dir)

    def to_markdown(self, digits: int = 3) -> str:
        """The table as GitHub markdown (own writer: `DataFrame.to_markdown` needs the optional `tabulate`)."""
        table = self.table.reset_index()

        def cell(value) -> str:
            if isinstance(value, float):
                return "nan" if math.isnan(value) else f"{value:.{digits}f}"
            return str(value).replace("|", "\\|")

        header = list(table.columns)
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---:" if table[c].dtype.kind == "f" else "---" for c in header) + "|",
        ]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        best = self.best if self.candidates() else None
        return {
            "weight": self.weight,
            "best": None
            if best is None
            else {"key": best["key"], "layers": best["window"], "modules": best["modules"]},
            "table": json.loads(self.table.reset_index().to_json(orient="records")),
            "records": self.records,
        }

    def save(self, path: str | None = None) -> str:
        """Write `search.json` (table, best, records) to `path` or the output directory; returns the path."""
        path = path or os.path.join(self._dir(), "search.json")
        _write_json(path, self.to_dict())
        return path

    def _dir(self) -> str:
        if self.output_dir is None:
            raise CoFiTuneError("this SearchResult has no `output_dir`; pass a path.")
        return self.output_dir

    @classmethod
    def load(cls, output_dir: str, weight: float | None = None) -> SearchResult:
        """Read a finished or partial search from `output_dir` (its per-candidate JSON files)."""
        files = sorted(glob.glob(os.path.join(output_dir, "candidates", "*.json")))
        if not files:
            raise CoFiTuneError(f"no search results in {output_dir!r} (expected {output_dir}/candidates/*.json).")
        records = []
        for f in files:
            with open(f) as fh:
                records.append(json.load(fh))
        records.sort(key=lambda r: r["order"])
        if weight is None:
            settings_path = os.path.join(output_dir, "settings.json")
            weight = 0.5
            if os.path.isfile(settings_path):
                with open(settings_path) as fh:
                    weight = json.load(fh).get("weight", 0.5)
        return cls(records, weight, output_dir)

    def plot(self, path: str) -> str:
        """Spec. (x) vs Vers. (y) of every candidate, with Uni. contours and the search tree's edges, as a PNG."""
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        points = {r["key"]: (self.scores(r)["Spec."], self.scores(r)["Vers."]) for r in self.records}
        finite = {k: p for k, p in points.items() if not (math.isnan(p[0]) or math.isnan(p[1]))}
        fig = Figure(figsize=(7.5, 6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        xs = [p[0] for p in finite.values()] or [0.0, 1.0]
        ys = [p[1] for p in finite.values()] or [0.0, 1.0]
        x0, x1 = min(*xs, 0.0) - 0.1, max(*xs, 1.0) + 0.1
        y0, y1 = min(ys) - 0.05, max(*ys, 1.0) + 0.05
        gx, gy = np.meshgrid(np.linspace(x0, x1, 100), np.linspace(y0, y1, 100))
        contours = ax.contour(
            gx, gy, self.weight * gx + (1 - self.weight) * gy, levels=8, colors="0.8", linewidths=0.8
        )
        ax.clabel(contours, fmt="Uni. %.2f", fontsize=7)
        for r in self.records:
            parent = r.get("parent")
            if parent in finite and r["key"] in finite:
                ax.annotate(
                    "", xy=finite[r["key"]], xytext=finite[parent], arrowprops={"arrowstyle": "->", "color": "0.6"}
                )
        markers = {"window": ("o", "tab:blue"), "module": ("s", "tab:orange"), "refine": ("D", "tab:green")}
        best_key = self.best["key"] if self.candidates() else None
        for r in self.records:
            if r["key"] not in finite:
                continue
            x, y = finite[r["key"]]
            if r["kind"] == "cofitune":
                marker, color = markers.get(r["level"], ("o", "tab:gray"))
                label = f"{r['window'][0]}-{r['window'][1]} {r['modules']}"
            else:
                marker, color, label = ("^", "black", "full FT") if r["kind"] == "full" else ("P", "tab:red", "base")
            ax.scatter([x], [y], marker=marker, color=color, s=36, zorder=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if r["key"] == best_key:
                ax.scatter([x], [y], marker="*", s=260, facecolors="none", edgecolors="gold", linewidths=1.5, zorder=4)
        for level, (marker, color) in markers.items():
            ax.scatter([], [], marker=marker, color=color, label=f"level: {level}")
        ax.legend(loc="lower left", fontsize=8)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel("Spec. (speciality gain / full fine-tuning's gain)")
        ax.set_ylabel("Vers. (versatility / base model's)")
        ax.set_title(f"CoFiTune coarse search (Uni. = {self.weight:g} Spec. + {1 - self.weight:g} Vers.)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return path


# ------------------------------------------------------------------ storage


def _write_json(path: str, payload: Any) -> None:
    """Write `payload` as JSON atomically: a crash leaves either the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


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


# ------------------------------------------------------------------ the search


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


# ------------------------------------------------------------------ command line


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as fh:
        items = [json.loads(line) for line in fh if line.strip()]
    if not items:
        raise CoFiTuneError(f"{path!r} holds no JSON lines.")
    return items


def read_general_text(path: str, min_chars: int = 800) -> list[str]:
    """Paragraphs (blank-line separated) of a text file, merged into chunks of at least `min_chars` characters."""
    with open(path) as fh:
        paragraphs = [p.strip() for p in fh.read().split("\n\n") if p.strip()]
    chunks, current = [], ""
    for p in paragraphs:
        current = f"{current}\n\n{p}" if current else p
        if len(current) >= min_chars:
            chunks.append(current)
            current = ""
    if current:
        chunks.append(current)
    if not chunks:
        raise CoFiTuneError(f"{path!r} holds no text.")
    return chunks


def _model_loader(name: str):
    if name in ("smollm2", "smollm2-135m-instruct"):
        from .models import load_smollm2

        return load_smollm2, load_smollm2()[1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(name):
        raise CoFiTuneError(f"`--model` must be 'smollm2' or a local model directory, got {name!r}.")
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (lambda: AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)), tokenizer


def _parse_windows(text: str | None) -> list[tuple[int, int]] | None:
    if not text:
        return None
    try:
        return [tuple(int(x) for x in part.split(":")) for part in text.split(",")]
    except ValueError:
        raise CoFiTuneError(f"`--windows` takes 'a:b,c:d' (0-based, b exclusive), got {text!r}.") from None


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="'smollm2' (the embedded SmolLM2-135M-Instruct) or a path")
    parser.add_argument("--train", required=True, help="training JSONL: prompt/completion, messages or text")
    parser.add_argument("--eval", required=True, help="speciality JSONL: prompt/answer (or prompt/options/answer)")
    parser.add_argument("--general", help="general text file for versatility (CE drift and KL)")
    parser.add_argument("--probes", help="versatility probes JSONL: prompt/answer or prompt/options/answer")
    parser.add_argument("--budget-steps", type=int, required=True, help="optimizer steps of every fine-tune")
    parser.add_argument("--output-dir", required=True, help="results directory (re-run to resume)")
    parser.add_argument("--lr", type=float, default=1e-4, help="CoFiTune candidates' learning rate")
    parser.add_argument("--full-lr", type=float, default=2e-5, help="full fine-tuning reference's learning rate")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation length of exact-match evals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", default=",".join(LEVELS), help="comma-separated subset of window,module,refine")
    parser.add_argument("--width", type=int, default=2, help="level-1 windows that get other modules in level 2")
    parser.add_argument("--windows", help="level-1 windows instead of the paper's, e.g. '7:15,15:22'")
    parser.add_argument("--weight", type=float, default=0.5, help="weight of Spec. in Uni.")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def search_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    loader, tokenizer = _model_loader(args.model)
    evals = _read_jsonl(args.eval)
    progress = not args.no_progress
    if all("options" in x for x in evals):
        speciality = SpecialityEval.multiple_choice(evals, tokenizer=tokenizer, progress=progress)
    else:
        speciality = SpecialityEval.exact_match(
            evals, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, progress=progress
        )
    general = read_general_text(args.general) if args.general else None
    probes = _read_jsonl(args.probes) if args.probes else None
    versatility = VersatilityEval.default(
        general, probes, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, progress=progress
    )
    result = search_layers(
        loader,
        _read_jsonl(args.train),
        speciality,
        versatility,
        tokenizer=tokenizer,
        budget_steps=args.budget_steps,
        output_dir=args.output_dir,
        learning_rate=args.lr,
        full_ft_learning_rate=args.full_lr,
        windows=_parse_windows(args.windows),
        levels=[x.strip() for x in args.levels.split(",") if x.strip()],
        width=args.width,
        seed=args.seed,
        progress=progress,
        weight=args.weight,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    _print_report(result, os.path.join(args.output_dir, "search.png"))
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="a search's output directory (finished or partial)")
    parser.add_argument("--weight", type=float, help="weight of Spec. in Uni. (default: the search's)")
    parser.add_argument("--plot", help="where to write the plot (default: OUTPUT_DIR/search.png)")


def report_command(args: argparse.Namespace) -> int:
    result = SearchResult.load(args.output_dir, weight=args.weight)
    _print_report(result, args.plot or os.path.join(args.output_dir, "search.png"))
    return 0


def _print_report(result: SearchResult, plot_path: str) -> None:
    print(result.to_markdown())
    if result.candidates():
        best = result.best
        print(f"\nbest: CoFiTuneConfig(layers={tuple(best['window'])}, target_modules={best['modules']!r})")
    print(f"plot: {result.plot(plot_path)}")
