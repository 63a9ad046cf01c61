"""Paired bootstrap intervals over items, and the rule that calls a difference real or noise.

Every run of a comparison is scored on the same items (questions, probes, general texts) of each split, and its record
keeps the per-item values (`items`: 0/1 per question and probe, summed CE and KL per text). A bootstrap resample
draws items with replacement, per kind, and recomputes every run's Spec., Vers. and Uni. on the *same* draw, the base
model's and the reference's included: the spread of `score(a) - score(b)` over draws is the item noise of a
difference, with the run-to-run noise (seeds) measured separately. Rule (docs/results.md): a difference is *real* only
when it is larger than the seed spread (the sum of the two standard deviations over seeds) *and* its interval
excludes 0; otherwise it is noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Kinds of items, and the record fields that hold them (`items` of a split).
ITEM_KINDS = ("speciality", "probes_gen", "probes_mc", "texts")
LEVEL = 0.95


def _items(record: Mapping[str, Any], split: str) -> dict[str, np.ndarray] | None:
    items = (record.get(split) or {}).get("items")
    if not items or "speciality" not in items:
        return None
    out = {k: np.asarray(items[k], dtype=np.float64) for k in ("speciality", "probes_gen", "probes_mc") if k in items}
    if "ce_sum" in items:
        out.update(
            ce_sum=np.asarray(items["ce_sum"], dtype=np.float64),
            kl_sum=np.asarray(items["kl_sum"], dtype=np.float64),
            tokens=np.asarray(items["tokens"], dtype=np.float64),
        )
    return out


def resample(
    records: Mapping[str, Mapping[str, Any]],
    base_key: str,
    reference_key: str,
    split: str,
    *,
    weight: float = 0.5,
    n: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Spec., Vers. (each retention capped at 1) and Uni. of every record over `n` paired bootstrap draws of `split`.

    Args:
        records (`Mapping[str, Mapping]`): run records by key (`runs/<key>.json`), all scored on the same items.
        base_key (`str`): the base model's record (Spec. 0, retentions' denominators).
        reference_key (`str`): the full fine-tuning record Spec. is relative to.
        split (`str`): `"validation"` or `"test"`.
        weight (`float`, *optional*, defaults to 0.5): Spec.'s weight in Uni.
        n (`int`, *optional*, defaults to 2000): draws.
        seed (`int`, *optional*, defaults to 0): the draws' seed.

    Returns:
        `{key: {"spec", "vers", "uni": [n] arrays}}` for the records with per-item values of the same sizes as the base
        model's (others are left out); a draw where the reference's speciality equals the base model's has Spec. NaN.
    """
    base = _items(records[base_key], split) if base_key in records else None
    ref = _items(records[reference_key], split) if reference_key in records else None
    if base is None or ref is None:
        return {}
    rng = np.random.default_rng(seed)
    sizes = {k: v.shape[0] for k, v in base.items()}
    draws = {k: rng.integers(0, sizes[k], size=(n, sizes[k])) for k in ("speciality", "probes_gen", "probes_mc")
             if sizes.get(k)}  # fmt: skip
    if sizes.get("tokens"):
        draws["texts"] = rng.integers(0, sizes["tokens"], size=(n, sizes["tokens"]))

    def mean(values, kind):
        return values[draws[kind]].mean(axis=1)  # [n]

    def per_token(values, tokens):
        return values[draws["texts"]].sum(axis=1) / tokens[draws["texts"]].sum(axis=1)  # [n]

    base_spec, ref_spec = mean(base["speciality"], "speciality"), mean(ref["speciality"], "speciality")
    gain = ref_spec - base_spec
    base_acc = {k: mean(base[k], k) for k in ("probes_gen", "probes_mc") if k in draws}
    base_ce = per_token(base["ce_sum"], base["tokens"]) if "texts" in draws else None
    out = {}
    for key, record in records.items():
        items = _items(record, split)
        if items is None or any(items[k].shape[0] != sizes[k] for k in items if k in sizes):
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            spec = np.where(np.abs(gain) > 1e-12, (mean(items["speciality"], "speciality") - base_spec) / gain, np.nan)
        versatility = record[split]["versatility"]
        weights = versatility.get("weights") or {}
        present = set(versatility.get("components") or {})
        parts, total = 0.0, 0.0
        for kind in ("probes_gen", "probes_mc"):
            if kind in present and kind in base_acc and kind in items:
                with np.errstate(divide="ignore", invalid="ignore"):
                    retention = np.minimum(1.0, mean(items[kind], kind) / base_acc[kind])
                retention = np.where(base_acc[kind] > 0, retention, 1.0)  # a draw where the base scores 0: no loss
                parts, total = parts + weights.get(kind, 1.0) * retention, total + weights.get(kind, 1.0)
        if "texts" in draws and "ce_sum" in items:
            if "ce" in present:
                ce = per_token(items["ce_sum"], items["tokens"])
                parts = parts + weights.get("ce", 1.0) * np.minimum(1.0, np.exp(-(ce - base_ce)))
                total += weights.get("ce", 1.0)
            if "kl" in present:
                kl = per_token(items["kl_sum"], items["tokens"])
                parts = parts + weights.get("kl", 1.0) * np.minimum(1.0, np.exp(-kl))
                total += weights.get("kl", 1.0)
        if total <= 0:
            continue
        vers = parts / total * np.ones(n)
        out[key] = {"spec": spec, "vers": vers, "uni": weight * spec + (1.0 - weight) * vers}
    return out


def interval(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """The central `level` interval of `a - b` over the draws (NaN draws left out), or None without draws."""
    diff = np.asarray(a) - np.asarray(b)
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return None
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(diff, [tail, 1.0 - tail])
    return float(low), float(high)


def call_difference(diff: float, spread: float | None, bounds: Sequence[float] | None) -> str:
    """`"real"`, `"noise"` or `"unmeasured"` for a difference of means `diff`.

    `spread` is the sum of the two standard deviations over seeds (None when either side has one seed); `bounds` the
    paired bootstrap interval of the difference (None when the runs have no per-item values). Real: beyond the spread
    and an interval that excludes 0. Noise: within the spread, or an interval that holds 0. Unmeasured: what can be
    measured does not make it noise, but the rest is missing (one seed, or no per-item values).
    """
    if diff is None or not math.isfinite(diff):
        return "unmeasured"
    inside = bounds is not None and bounds[0] <= 0.0 <= bounds[1]
    if inside or (spread is not None and abs(diff) <= spread):
        return "noise"
    if spread is None or bounds is None:
        return "unmeasured"
    return "real"
