"""`Importance`: per-layer unit importance for versatility, the input of CoFiTune's Fine-SoftMask.

Three parts, any of which may be absent: `heads` `[layers, num_heads]`, `intermediate` `[layers, intermediate_size]`
and `output` `[layers, hidden_size]`. Values are normalised to [0, 1]: 1 means "never change this unit", 0 means "no
protection". `estimate_importance` (the KL robustness proxy) produces one; this module holds the container, the
normalisation of raw scores, and the per-row scale of a trained weight that the soft mask is built from.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .architectures import Dims, ModuleLayout, dims_of, segment_widths, spec_for
from .errors import CoFiTuneError, missing_extra
from .utils import atomic_path

PARTS = ("heads", "intermediate", "output")
FORMAT = "cofitune-importance"
FORMAT_VERSION = "1"


NORMALIZATIONS = ("abs_tanh", "one_sided")


def normalize(raw: torch.Tensor, method: str = "abs_tanh") -> torch.Tensor:
    """Per-layer normalisation of raw scores into [0, 1), from `z = (I - mean) / std` within each layer.

    `"abs_tanh"` is the authors' `|tanh(z)|`: it protects a unit far *below* its layer's mean as strongly as one far
    above it. `"one_sided"` is `tanh(max(z, 0))`: only units above their layer's mean are protected. A layer whose raw
    values are all equal carries no ranking, so it maps to 0 (no protection).

    Args:
        raw (`torch.Tensor`): `[layers, units]`.
        method (`str`, *optional*, defaults to `"abs_tanh"`): one of `NORMALIZATIONS`.
    """
    if method not in NORMALIZATIONS:
        raise CoFiTuneError(f"`normalization` must be one of {NORMALIZATIONS}, got {method!r}.")
    raw = raw.double()
    mean = raw.mean(dim=1, keepdim=True)  # [layers, 1]
    std = raw.std(dim=1, keepdim=True, unbiased=True) if raw.shape[1] > 1 else torch.zeros_like(mean)
    z = torch.where(std > 0, (raw - mean) / std.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(raw))
    if method == "one_sided":
        return torch.tanh(z.clamp_min(0)).float()  # [layers, units]
    return torch.tanh(z).abs().float()  # [layers, units]


def _check_tensor(name: str, value: Any, normalized: bool) -> torch.Tensor | None:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise CoFiTuneError(
                f"`{name}` must be a tensor of shape [layers, units], got {type(value).__name__}."
            ) from err
    if value.dim() != 2 or value.shape[0] == 0 or value.shape[1] == 0:
        raise CoFiTuneError(
            f"`{name}` must be a 2-D tensor [layers, units] with both sizes > 0, got shape {tuple(value.shape)}."
        )
    value = value.detach().float().cpu()
    if not torch.isfinite(value).all():
        bad = int((~torch.isfinite(value)).sum())
        raise CoFiTuneError(
            f"`{name}` holds {bad} NaN/inf value(s); re-estimate the importance (a NaN usually means the model "
            "produced NaN logits on the importance data) or replace them, e.g. with torch.nan_to_num."
        )
    if normalized and (value.min() < 0 or value.max() > 1):
        raise CoFiTuneError(
            f"`{name}` must lie in [0, 1] when `normalized=True`, got values in [{value.min():.4g}, {value.max():.4g}]; "
            "pass `normalized=False` to apply the per-layer |tanh(z)| normalisation to raw scores."
        )
    return value.contiguous()


@dataclass
class Importance:
    """Normalised importance of attention heads, FFN intermediate units and FFN outputs, per decoder layer.

    Args:
        heads (`torch.Tensor`, *optional*): `[layers, num_heads]`.
        intermediate (`torch.Tensor`, *optional*): `[layers, intermediate_size]`.
        output (`torch.Tensor`, *optional*): `[layers, hidden_size]`.
        normalized (`bool`, *optional*, defaults to `False`): `False` treats the values as raw scores and applies the
            per-layer normalisation (`normalization`); `True` takes them as given (they must lie in [0, 1]).
        normalization (`str`, *optional*, defaults to `"abs_tanh"`): how raw scores are normalised: the authors'
            `|tanh(z)|` or `"one_sided"` `tanh(max(z, 0))` (see `normalize`). Recorded in `metadata`.
        metadata (`dict[str, str]`, *optional*): free-form provenance (model, data, number of tokens), saved with it.

    Example:

    ```python
    >>> import torch
    >>> from cofitune_peft import Importance
    >>> imp = Importance(intermediate=torch.rand(4, 48), output=torch.rand(4, 32))
    >>> imp.num_layers, round(float(imp.intermediate.max()), 2) <= 1.0
    (4, True)
    ```
    """

    heads: torch.Tensor | None = None
    intermediate: torch.Tensor | None = None
    output: torch.Tensor | None = None
    normalized: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    normalization: str = "abs_tanh"

    def __post_init__(self):
        if not isinstance(self.normalized, bool):
            raise CoFiTuneError(f"`normalized` must be True or False, got {self.normalized!r}.")
        if self.normalization not in NORMALIZATIONS:
            raise CoFiTuneError(f"`normalization` must be one of {NORMALIZATIONS}, got {self.normalization!r}.")
        raw = not self.normalized
        for part in PARTS:
            value = _check_tensor(part, getattr(self, part), self.normalized)
            if value is not None and raw:
                value = normalize(value, self.normalization)
            setattr(self, part, value)
        present = {p: getattr(self, p) for p in PARTS if getattr(self, p) is not None}
        if not present:
            raise CoFiTuneError(
                "`Importance` needs at least one of `heads`, `intermediate` or `output`; got none. Estimate one "
                "with `estimate_importance(model, data)`."
            )
        layer_counts = {p: v.shape[0] for p, v in present.items()}
        if len(set(layer_counts.values())) != 1:
            raise CoFiTuneError(
                f"the parts of an `Importance` must have the same number of layers, got {layer_counts}."
            )
        self.metadata = {str(k): str(v) for k, v in (self.metadata or {}).items()}
        if raw:
            self.metadata["normalization"] = self.normalization
        # From here on, values are normalised.
        self.normalized = True

    @property
    def num_layers(self) -> int:
        return next(getattr(self, p) for p in PARTS if getattr(self, p) is not None).shape[0]

    def parts(self) -> dict[str, torch.Tensor]:
        """The present parts, by name."""
        return {p: getattr(self, p) for p in PARTS if getattr(self, p) is not None}

    def validate_for(self, model, source: str = "importance") -> None:
        """Raise `CoFiTuneError` unless the shapes match `model` (a transformers model or a PeftModel)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        dims = dims_of(base, spec_for(base))
        self.validate_dims(dims, source)

    def validate_dims(self, dims, source: str = "importance") -> None:
        expected = {
            "heads": (dims.num_layers, dims.num_heads),
            "intermediate": (dims.num_layers, dims.intermediate),
            "output": (dims.num_layers, dims.hidden),
        }
        for part, value in self.parts().items():
            if tuple(value.shape) != expected[part]:
                origin = self.metadata.get("model", "another model")
                where = f" (file {self.metadata['source']})" if self.metadata.get("source") else ""
                raise CoFiTuneError(
                    f"`{source}`{where}: part `{part}` has shape {tuple(value.shape)} but this model needs {expected[part]} "
                    f"([layers, units]); it was estimated on {origin}. Estimate the importance on this model."
                )

    @classmethod
    def combine(cls, importances: list[Importance]) -> Importance:
        """Element-wise max of several importances (e.g. from several general data sets), part by part.

        A part present in only some inputs is taken from those.
        """
        importances = list(importances)
        if not importances:
            raise CoFiTuneError("`importances` must hold at least one `Importance`, got an empty list.")
        for i, imp in enumerate(importances):
            if not isinstance(imp, Importance):
                raise CoFiTuneError(f"`importances[{i}]` must be an `Importance`, got {type(imp).__name__}.")
        combined = {}
        for part in PARTS:
            values = [getattr(imp, part) for imp in importances if getattr(imp, part) is not None]
            if not values:
                continue
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise CoFiTuneError(f"cannot combine `{part}` of different shapes {sorted(shapes)}; use one model.")
            combined[part] = torch.stack(values).amax(dim=0)
        meta = {"combined_from": str(len(importances))}
        return cls(**combined, normalized=True, metadata=meta)

    def top_fraction(self, fraction: float) -> Importance:
        """A hard mask: importance 1 for the top `fraction` of units of every layer and part (by this importance), 0
        for the rest.

        Under `softmask_mode="update"` the chosen units' rows are frozen and every other row trains at the full rate
        (scale 1). Per layer and part, `round(fraction * units)` units are chosen (half rounds up); ties go to the
        lower unit index. Key/value heads under grouped-query attention take the max of their query heads, as for any
        importance, so a k/v head is frozen when one of the query heads it serves is chosen.

        Args:
            fraction (`float`): in [0, 1]; 0 protects nothing (plain coarse fine-tuning), 1 freezes every unit.

        Example:

        ```python
        >>> import torch
        >>> from cofitune_peft import Importance
        >>> hard = Importance(intermediate=torch.rand(4, 48)).top_fraction(0.25)
        >>> hard.intermediate.sum(dim=1).tolist()
        [12.0, 12.0, 12.0, 12.0]
        ```
        """
        ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0.0 <= fraction <= 1.0
        if not ok:
            raise CoFiTuneError(
                f"`fraction` must be a number in [0, 1] (the share of units per layer to freeze), got {fraction!r}."
            )
        hard = {}
        for part, values in self.parts().items():
            units = values.shape[1]
            count = math.floor(fraction * units + 0.5)
            # stable descending sort: equal values keep their index order, so the lower index wins a tie
            order = torch.sort(values, dim=1, descending=True, stable=True).indices  # [layers, units]
            mask = torch.zeros_like(values)  # [layers, units]
            mask.scatter_(1, order[:, :count], 1.0)
            hard[part] = mask
        metadata = {**self.metadata, "top_fraction": repr(float(fraction))}
        out = Importance(**hard, normalized=True, metadata=metadata)
        out.normalization = self.normalization
        return out

    def to(self, *args, **kwargs) -> Importance:
        """A copy with every part moved/cast like `Tensor.to`."""
        moved = {p: v.to(*args, **kwargs) for p, v in self.parts().items()}
        out = Importance.__new__(Importance)
        out.heads, out.intermediate, out.output = (moved.get(p) for p in PARTS)
        out.normalized, out.metadata, out.normalization = True, dict(self.metadata), self.normalization
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean importance and fraction of units with importance > 0.9, per part."""
        return {
            p: {"mean": float(v.mean()), "frac_above_0.9": float((v > 0.9).float().mean())}
            for p, v in self.parts().items()
        }

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (atomically: a temp file renamed into place)."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise CoFiTuneError(f"`path`: the folder {directory!r} does not exist; create it first.")
        metadata = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "normalized": "true",
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        with atomic_path(path) as tmp:
            save_file({p: v.contiguous() for p, v in self.parts().items()}, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Importance:
        """Read a file written by `save`; a `CoFiTuneError` names the file if it is missing or not an importance."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CoFiTuneError(f"`importance`: no file at {path!r}; estimate one with `cofitune importance`.")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except Exception as err:  # safetensors raises several types for corrupt files
            raise CoFiTuneError(f"`importance`: {path!r} is not a readable safetensors file ({err}).") from err
        if meta.get("format") != FORMAT:
            raise CoFiTuneError(
                f"`importance`: {path!r} is a safetensors file but not a CoFiTune importance file "
                f"(format={meta.get('format')!r}); write it with `Importance.save`."
            )
        unknown = set(tensors) - set(PARTS)
        if unknown:
            raise CoFiTuneError(f"`importance`: {path!r} holds unknown parts {sorted(unknown)}; expected {PARTS}.")
        try:
            user_meta = json.loads(meta.get("metadata", "{}"))
        except json.JSONDecodeError:
            user_meta = {}
        user_meta["source"] = path
        return cls(**tensors, normalized=meta.get("normalized") == "true", metadata=user_meta)

    def plot(self, path: str | os.PathLike, title: str | None = None) -> None:
        """A layers x units heatmap per part, written as a PNG (needs matplotlib: `pip install "cofitune-peft[eval]"`)."""
        try:
            from matplotlib.figure import Figure
        except ModuleNotFoundError as err:
            raise missing_extra("matplotlib", "`Importance.plot`", "eval") from err

        parts = self.parts()
        fig = Figure(figsize=(5 * len(parts), 4), layout="constrained")
        axes = fig.subplots(1, len(parts), squeeze=False)
        for ax, (name, values) in zip(axes[0], parts.items()):
            im = ax.imshow(values.numpy(), aspect="auto", interpolation="nearest", vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{name} {tuple(values.shape)}")
            ax.set_xlabel("unit")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(title or "CoFiTune importance (1 = protected)")
        fig.savefig(os.fspath(path), dpi=100)


def resolve_importance(value: Importance | str | os.PathLike | None) -> Importance | None:
    """Accept an `Importance`, a path to one, or None."""
    if value is None or isinstance(value, Importance):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Importance.load(value)
    raise CoFiTuneError(
        f"`importance` must be None, a path to an importance file or an `Importance`, got {type(value).__name__}."
    )


# ---------------------------------------------------------------------- per-row scales of the soft mask


def kv_head_importance(heads: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Importance of each key/value head under grouped-query attention: the max over the query heads it serves.

    The max keeps a shared k/v projection as protected as its most important query head.

    Args:
        heads (`torch.Tensor`): `[num_heads]`.
    """
    num_heads = heads.shape[0]
    if num_kv_heads == num_heads:
        return heads
    group = num_heads // num_kv_heads
    return heads.view(num_kv_heads, group).amax(dim=1)  # [num_kv_heads]


def unit_keep(importance: Importance | None, layer: int, unit: str, dims: Dims) -> torch.Tensor | None:
    """`1 - I` for every unit of `unit` type in `layer`, or None when the importance does not cover that unit."""
    if importance is None:
        return None
    if unit == "intermediate":
        values = importance.intermediate
    elif unit == "output":
        values = importance.output
    elif unit in ("head", "kv_head"):
        values = importance.heads
    else:
        return None
    if values is None:
        return None
    row = values[layer].float()
    if unit == "kv_head":
        row = kv_head_importance(row, dims.num_kv_heads)
    return 1.0 - row  # [units]


def module_scale(
    importance: Importance | None, layer: int, layout: ModuleLayout, dims: Dims, size: int
) -> tuple[torch.Tensor, list[str]]:
    """The soft-mask factor of every row (or column) of one module, and the units the importance did not cover.

    Returns:
        `(scale, uncovered)`: `scale` is `[size]` with values in [0, 1]; `uncovered` lists the unit types that got
        scale 1 because the importance has no values for them.
    """
    widths = segment_widths(layout, dims, size)
    parts, uncovered = [], []
    for seg, width in zip(layout.segments, widths):
        keep = unit_keep(importance, layer, seg.unit, dims)
        if keep is None:
            if importance is not None and seg.unit != "none":
                uncovered.append(seg.unit)
            parts.append(torch.ones(width))
        else:
            parts.append(keep.repeat_interleave(width // keep.shape[0]))
    return torch.cat(parts), uncovered  # [size]


def mean_one_factor(scales: torch.Tensor, cap: float) -> float:
    """The factor `c` for which `min(c * scales, cap)` has mean 1 (water-filling), for `mask_budget="mean_one"`.

    `c * scales` keeps the mask's shape (and the order of the rows); rows that would exceed `cap` are held at it and the
    others are rescaled again, until no new row reaches the cap. When the rows that can move cannot reach a mean of 1
    even at the cap (too many zero scales), every nonzero row ends at the cap and the mean stays below 1: check it with
    `min(c * scales, cap).mean()`.

    Args:
        scales (`torch.Tensor`): `[rows]`, the raw scales `1 - I` (>= 0) of the trained rows, pooled over modules.
        cap (`float`): the largest scale a row may get (>= 1).
    """
    values = scales.detach().double().flatten().cpu()  # [rows]
    n = values.numel()
    if n == 0:
        return 1.0
    capped = torch.zeros(n, dtype=torch.bool)
    factor = 1.0
    for _ in range(n + 1):  # the capped set only grows, so this ends after at most n rounds
        free_total = float(values[~capped].sum())
        budget = n - cap * int(capped.sum())
        if free_total <= 0.0 or budget <= 0.0:
            break
        factor = budget / free_total
        grown = capped | (factor * values >= cap)
        if torch.equal(grown, capped):
            break
        capped = grown
    return factor
