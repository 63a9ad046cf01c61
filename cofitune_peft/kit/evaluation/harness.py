"""Versatility from lm-evaluation-harness tasks (MMLU, ARC, HellaSwag, or local task files), relative to the base model.

CoFiTune (arXiv 2404.10306) measures versatility on general benchmarks (MMLU, ARC, ...). `HarnessVersatility` runs
such tasks through lm-evaluation-harness on the model in memory (`lm_eval.models.huggingface.HFLM(pretrained=model,
tokenizer=tokenizer)` and `lm_eval.simple_evaluate`), and turns each task's metric into a retention relative to the
base model, the way `VersatilityEval` does: `prepare(base_model)` keeps the base model's metrics, `evaluate(model)`
returns `{"score", "components", "metrics"}` with `score` 1.0 for the base model. It works offline with task YAML
files of your own (`include_path=`), e.g. a multiple-choice task over a local JSON file:

```yaml
task: my_mc
dataset_path: json
dataset_kwargs: {data_files: {test: /data/my_mc.json}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list: [{metric: acc}]
```

Needs `pip install lm-eval` (tested with lm-eval 0.4.13).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from cofitune_peft import CoFiTuneError
from cofitune_peft.errors import missing_extra

from .model_passes import eval_mode
from .versatility import BaseModelReference

logger = logging.getLogger(__name__)

# The metric a task is scored by when `metrics` does not name one, in order of preference.
PREFERRED_METRICS = ("acc_norm", "acc", "exact_match", "em", "f1", "bleu")


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and (err.name or "").partition(".")[0] == "lm_eval":
            raise missing_extra("lm_eval", "`HarnessVersatility` (lm-evaluation-harness)", "eval") from err
        raise CoFiTuneError(
            f"`HarnessVersatility`: lm-evaluation-harness is installed but cannot load ({err})."
        ) from err
    return lm_eval, HFLM, TaskManager


def pick_metric(task_results: Mapping[str, Any], metric: str | None = None) -> tuple[str, float]:
    """The `(key, value)` a task is scored by: `metric` (with or without its `,filter` suffix) or the preferred one.

    Example:

    ```python
    >>> pick_metric({"alias": "arc", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6})
    ('acc_norm,none', 0.6)
    ```
    """
    numeric = {
        k: float(v)
        for k, v in task_results.items()
        if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    wanted = [metric] if metric else list(PREFERRED_METRICS)
    for name in wanted:
        for key, value in numeric.items():
            if key == name or key.split(",")[0] == name:
                return key, value
    if metric is None and numeric:
        key = sorted(numeric)[0]
        return key, numeric[key]
    raise CoFiTuneError(
        f"`metrics`: the task reports {sorted(numeric)}, none of them {metric or PREFERRED_METRICS!r}; name one of "
        "those metrics for this task."
    )


class HarnessVersatility(BaseModelReference):
    """Versatility from lm-evaluation-harness tasks, as retention relative to the base model (1.0 for the base).

    `score = sum_t w_t * (metric_t(tuned) / metric_t(base)) / sum_t w_t` over the tasks (weights 1 by default). A task
    the base model scores 0 on cannot be relative and is left out, with a warning. Drop-in for `VersatilityEval` in
    `compare_methods` and `search_layers` (same `prepare`, `evaluate`, `reference_state`, `fingerprint`).

    Args:
        tasks (`Sequence[str]`): lm-eval task (or group) names, e.g. `["arc_easy", "hellaswag"]` or a local task's.
        include_path (`str`, *optional*): a folder of task YAML files of your own (offline tasks).
        metrics (`Mapping[str, str]`, *optional*): task -> metric to score it by (e.g. `{"hellaswag": "acc_norm"}`);
            others use the first of `PREFERRED_METRICS` the task reports.
        weights (`Mapping[str, float]`, *optional*): task -> weight in the score (1 each by default).
        limit (`int | float`, *optional*): examples per task (lm-eval's `limit`; a float is a fraction), for speed.
        num_fewshot (`int`, *optional*): few-shot examples (lm-eval's default per task when `None`).
        batch_size (`int`, *optional*, defaults to 8): HFLM's batch size.
        max_length (`int`, *optional*): HFLM's context length (the model's when `None`).
        tokenizer (*optional*): the default tokenizer (a call may pass another).
        seed (`int`, *optional*, defaults to 0): lm-eval's random, numpy, torch and few-shot seeds.
        include_defaults (`bool`, *optional*, defaults to `True`): also index lm-eval's own tasks; `False` loads only
            `include_path` (much faster to start when every task is local).

    Example:

    ```python
    >>> vers = HarnessVersatility(["my_mc"], include_path="tasks/", tokenizer=tok)  # doctest: +SKIP
    >>> vers.prepare(base)  # doctest: +SKIP
    >>> vers(tuned)  # doctest: +SKIP
    0.97
    ```
    """

    _stale_reference = (
        "the saved lm-eval reference was computed on other tasks or settings; call `prepare(base_model)` again."
    )

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        include_path: str | os.PathLike | None = None,
        metrics: Mapping[str, str] | None = None,
        weights: Mapping[str, float] | None = None,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        tokenizer=None,
        seed: int = 0,
        include_defaults: bool = True,
    ):
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        problems = []
        if not tasks:
            problems.append("`tasks` is empty; name at least one lm-eval task.")
        if include_path is not None and not os.path.isdir(include_path):
            problems.append(f"`include_path` must be a folder of task YAML files, got {os.fspath(include_path)!r}.")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(tasks)) + sorted(set(metrics or {}) - set(tasks))
        if unknown:
            problems.append(f"`weights`/`metrics` name tasks that are not in `tasks` ({tasks}): {unknown}.")
        if any(not w >= 0 for w in weights.values()):
            problems.append(f"`weights` must be >= 0, got {weights}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            problems.append(f"`batch_size` must be a positive int, got {batch_size!r}.")
        if problems:
            raise CoFiTuneError("Invalid HarnessVersatility arguments:\n  - " + "\n  - ".join(problems))
        self.tasks = tasks
        self.include_path = os.fspath(include_path) if include_path is not None else None
        self.metrics = dict(metrics or {})
        self.weights = {t: float(weights.get(t, 1.0)) for t in tasks}
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = tokenizer
        self.seed = seed
        self.include_defaults = include_defaults
        if not include_defaults and self.include_path is None:
            raise CoFiTuneError("`include_defaults=False` needs `include_path` (the folder of your task files).")
        self.reference: dict[str, Any] | None = None
        self._task_manager = None

    @property
    def fingerprint(self) -> str:
        """A hash of the tasks, settings and, for local tasks, the bytes of the task files and the data they read."""
        digest = hashlib.sha256()
        settings = (self.tasks, sorted(self.metrics.items()), sorted(self.weights.items()), self.limit)
        digest.update(repr((settings, self.num_fewshot, self.max_length, self.seed)).encode())
        if self.include_path:
            for path in sorted(glob.glob(os.path.join(self.include_path, "**", "*"), recursive=True)):
                if os.path.isfile(path):
                    digest.update(os.path.relpath(path, self.include_path).encode())
                    with open(path, "rb") as fh:
                        digest.update(fh.read())
        return digest.hexdigest()[:16]

    def _manager(self):
        if self._task_manager is None:
            _, _, TaskManager = _import_lm_eval()
            kwargs = {"include_path": self.include_path} if self.include_path else {}
            self._task_manager = TaskManager(include_defaults=self.include_defaults, **kwargs)
        return self._task_manager

    def run(self, model, tokenizer=None) -> dict[str, dict[str, Any]]:
        """lm-eval's raw results per task: `{task: {"metric": key, "value": float, "results": {...}}}`."""
        lm_eval, HFLM, _ = _import_lm_eval()
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise CoFiTuneError("a `tokenizer` is needed: pass it to HarnessVersatility or to the call.")
        kwargs = {"max_length": self.max_length} if self.max_length else {}
        with eval_mode(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, **kwargs)
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=self.tasks,
                task_manager=self._manager(),
                limit=self.limit,
                num_fewshot=self.num_fewshot,
                log_samples=False,
                random_seed=self.seed,
                numpy_random_seed=self.seed,
                torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
                verbosity="ERROR",
            )
        found = {**(out.get("groups") or {}), **out["results"]}
        results = {}
        for task in self.tasks:
            if task not in found:
                raise CoFiTuneError(f"`tasks`: lm-eval returned no result for {task!r} (got {sorted(found)}).")
            key, value = pick_metric(found[task], self.metrics.get(task))
            results[task] = {"metric": key, "value": value, "results": dict(found[task])}
        return results

    def prepare(self, base_model, tokenizer=None) -> dict[str, Any]:
        """Run the tasks on the base model and keep its metrics; returns them."""
        raw = self.run(base_model, tokenizer)
        ref: dict[str, Any] = {"fingerprint": self.fingerprint}
        for task, item in raw.items():
            ref[task] = item["value"]
            if item["value"] <= 0:
                warnings.warn(
                    f"the base model scores 0 on the lm-eval task {task!r}, so it cannot measure retention and is "
                    "left out of versatility; use tasks the base model partly solves.",
                    stacklevel=2,
                )
        self.reference = ref
        logger.info("lm-eval reference of the base model: %s", {t: ref[t] for t in self.tasks})
        return dict(ref)

    def evaluate(self, model, tokenizer=None) -> dict[str, Any]:
        """Score `model`: `{"score", "components": {task: retention}, "metrics": {task: value}, "base_metrics"}`."""
        if self.reference is None:
            raise CoFiTuneError(
                "HarnessVersatility has no base-model reference: call `prepare(base_model)` before scoring a model."
            )
        raw = self.run(model, tokenizer)
        metrics = {t: raw[t]["value"] for t in self.tasks}
        components = {t: metrics[t] / self.reference[t] for t in self.tasks if self.reference[t] > 0}
        weighted = {t: r for t, r in components.items() if self.weights[t] > 0}
        if not weighted:
            raise CoFiTuneError(
                f"no lm-eval task is left: the base model scores 0 on every weighted task ({self.reference})."
            )
        total = sum(self.weights[t] for t in weighted)
        score = sum(self.weights[t] * r for t, r in weighted.items()) / total
        if not math.isfinite(score):
            raise CoFiTuneError(f"lm-eval returned a non-finite metric: {metrics}.")
        return {
            "score": score,
            "components": components,
            "metrics": metrics,
            "base_metrics": {t: self.reference[t] for t in self.tasks},
            "metric_names": {t: raw[t]["metric"] for t in self.tasks},
        }

    def __call__(self, model, tokenizer=None) -> float:
        return self.evaluate(model, tokenizer)["score"]

    def __repr__(self) -> str:
        return f"HarnessVersatility(tasks={self.tasks}, prepared={self.reference is not None})"
