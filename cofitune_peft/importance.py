"""`Importance`: per-layer unit importance for versatility, the input of CoFiTune's Fine-SoftMask.

Five parts, any of which may be absent: `heads` `[layers, num_heads]`, `intermediate` `[layers, intermediate_size]`,
`output` `[layers, hidden_size]` and, for mixture-of-experts layers, `expert_intermediate` `[layers, experts,
expert_intermediate_size]` and `expert_output` `[layers, experts, hidden_size]`. Where layers differ (a Mamba layer
has no heads, a MoE layer's shared expert is narrower than a dense layer's FFN), a part is as wide as its widest
layer and `units[part][layer]` says how many of a layer's values are real (the rest are 0). Values are normalised to
[0, 1]: 1 means "never change this unit", 0 means "no protection". `estimate_importance` (the KL robustness proxy)
produces one; this module holds the container, the normalisation of raw scores and the files; `scales.py` turns it
into the per-row scales the soft mask is built from.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .architectures import EXPERT_PARTS, PARTS, ModelLayout, model_layout
from .errors import CoFiTuneError, missing_extra
from .utils import atomic_path

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


def normalize_part(raw: torch.Tensor, method: str, units: list[int] | None = None) -> torch.Tensor:
    """`normalize` for one part: per layer over its real units (`units[layer]`, padding stays 0), and per layer and
    expert for the experts' parts (`[layers, experts, units]`: each expert is ranked among its own units)."""
    if raw.dim() == 3:
        return normalize(raw.flatten(0, 1), method).view(raw.shape)
    if units is None or all(u == raw.shape[1] for u in units):
        return normalize(raw, method)
    out = torch.zeros(raw.shape, dtype=torch.float32)
    for layer, count in enumerate(units):
        if count:
            out[layer, :count] = normalize(raw[layer : layer + 1, :count], method)[0]
    return out


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
    dims = 3 if name in EXPERT_PARTS else 2
    if value.dim() != dims or 0 in value.shape:
        shape = "[layers, experts, units]" if dims == 3 else "[layers, units]"
        raise CoFiTuneError(
            f"`{name}` must be a {dims}-D tensor {shape} with sizes > 0, got shape {tuple(value.shape)}."
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
    """Normalised importance of attention heads, FFN intermediate units and FFN outputs (and of each expert's), per
    decoder layer.

    Args:
        heads (`torch.Tensor`, *optional*): `[layers, num_heads]`.
        intermediate (`torch.Tensor`, *optional*): `[layers, intermediate_size]` (every dense FFN of a layer, shared
            experts included, one after the other).
        output (`torch.Tensor`, *optional*): `[layers, hidden_size]` (times the number of dense FFNs in a layer).
        normalized (`bool`, *optional*, defaults to `False`): `False` treats the values as raw scores and applies the
            per-layer normalisation (`normalization`); `True` takes them as given (they must lie in [0, 1]).
        normalization (`str`, *optional*, defaults to `"abs_tanh"`): how raw scores are normalised: the authors'
            `|tanh(z)|` or `"one_sided"` `tanh(max(z, 0))` (see `normalize`). Recorded in `metadata`.
        metadata (`dict[str, str]`, *optional*): free-form provenance (model, data, number of tokens), saved with it.
        expert_intermediate (`torch.Tensor`, *optional*): `[layers, experts, expert_intermediate_size]`.
        expert_output (`torch.Tensor`, *optional*): `[layers, experts, hidden_size]`.
        units (`dict[str, list[int]]`, *optional*): for parts whose width differs between layers, the number of real
            units of each layer (the rest of the row is padding, 0 after normalisation). `None`: every layer is full.

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
    expert_intermediate: torch.Tensor | None = None
    expert_output: torch.Tensor | None = None
    units: dict[str, list[int]] | None = None

    def __post_init__(self):
        if not isinstance(self.normalized, bool):
            raise CoFiTuneError(f"`normalized` must be True or False, got {self.normalized!r}.")
        if self.normalization not in NORMALIZATIONS:
            raise CoFiTuneError(f"`normalization` must be one of {NORMALIZATIONS}, got {self.normalization!r}.")
        raw = not self.normalized
        self.units = self._check_units()
        for part in PARTS:
            value = _check_tensor(part, getattr(self, part), self.normalized)
            if value is not None and raw:
                value = normalize_part(value, self.normalization, self.units.get(part))
            setattr(self, part, value)
        present = {p: getattr(self, p) for p in PARTS if getattr(self, p) is not None}
        if not present:
            raise CoFiTuneError(
                f"`Importance` needs at least one of {', '.join(f'`{p}`' for p in PARTS)}; got none. Estimate one "
                "with `estimate_importance(model, data)`."
            )
        for part, counts in self.units.items():
            if part not in present:
                raise CoFiTuneError(f"`units` gives `{part}`, which this importance does not have.")
            value = present[part]
            if len(counts) != value.shape[0] or any(not 0 <= c <= value.shape[1] for c in counts):
                raise CoFiTuneError(
                    f"`units[{part!r}]` must give one count in [0, {value.shape[1]}] per layer ({value.shape[0]}), "
                    f"got {counts}."
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

    def _check_units(self) -> dict[str, list[int]]:
        units = self.units or {}
        if not isinstance(units, dict):
            raise CoFiTuneError(f"`units` must be None or a dict of part -> units per layer, got {units!r}.")
        out = {}
        for part, counts in units.items():
            if part not in PARTS or part in EXPERT_PARTS:
                raise CoFiTuneError(f"`units` keys must be among {PARTS[:3]}, got {part!r}.")
            counts = [int(c) for c in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]
            out[part] = counts
        return out

    @property
    def num_layers(self) -> int:
        return next(getattr(self, p) for p in PARTS if getattr(self, p) is not None).shape[0]

    def parts(self) -> dict[str, torch.Tensor]:
        """The present parts, by name."""
        return {p: getattr(self, p) for p in PARTS if getattr(self, p) is not None}

    def validate_for(self, model, source: str = "importance", layout: ModelLayout | None = None) -> None:
        """Raise `CoFiTuneError` unless the shapes match `model` (a transformers model or a PeftModel)."""
        self.validate_layout(layout or model_layout(model), source)

    def validate_layout(self, layout: ModelLayout, source: str = "importance") -> None:
        """Raise `CoFiTuneError` unless every part has the shape the model's layout gives it."""
        widths = layout.widths()
        for part, value in self.parts().items():
            expected = (layout.num_layers, widths.get(part, 0))
            if part in EXPERT_PARTS:
                expected = (layout.num_layers, layout.experts(), widths.get(part, 0))
            if tuple(value.shape) != expected:
                origin = self.metadata.get("model", "another model")
                where = f" (file {self.metadata['source']})" if self.metadata.get("source") else ""
                raise CoFiTuneError(
                    f"`{source}`{where}: part `{part}` has shape {tuple(value.shape)} but this model needs {expected} "
                    f"({'[layers, experts, units]' if part in EXPERT_PARTS else '[layers, units]'}); it was estimated "
                    f"on {origin}. Estimate the importance on this model."
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
        units = {}
        for imp in importances:
            for part, counts in imp.units.items():
                units[part] = [max(a, b) for a, b in zip(units.get(part, counts), counts)]
        return cls(**combined, normalized=True, metadata=meta, units=units or None)

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
            flat = values.flatten(0, -2)  # [rows, units]: a layer, or a layer's expert
            counts = self.units.get(part, [flat.shape[1]] * flat.shape[0])
            mask = torch.zeros_like(flat)
            for row, units in enumerate(counts):
                count = math.floor(fraction * units + 0.5)
                # stable descending sort: equal values keep their index order, so the lower index wins a tie
                order = torch.sort(flat[row, :units], descending=True, stable=True).indices
                mask[row, order[:count]] = 1.0
            hard[part] = mask.view(values.shape)
        metadata = {**self.metadata, "top_fraction": repr(float(fraction))}
        out = Importance(**hard, normalized=True, metadata=metadata, units=self.units or None)
        out.normalization = self.normalization
        return out

    def to(self, *args, **kwargs) -> Importance:
        """A copy with every part moved/cast like `Tensor.to`."""
        moved = {p: v.to(*args, **kwargs) for p, v in self.parts().items()}
        out = Importance.__new__(Importance)
        for part in PARTS:
            setattr(out, part, moved.get(part))
        out.normalized, out.metadata, out.normalization = True, dict(self.metadata), self.normalization
        out.units = {p: list(c) for p, c in self.units.items()}
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
            tensors = {p: v.contiguous() for p, v in self.parts().items()}
            tensors.update({f"units.{p}": torch.tensor(c, dtype=torch.int64) for p, c in self.units.items()})
            save_file(tensors, tmp, metadata=metadata)

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
        units = {k.removeprefix("units."): tensors.pop(k).tolist() for k in list(tensors) if k.startswith("units.")}
        unknown = set(tensors) - set(PARTS)
        if unknown:
            raise CoFiTuneError(f"`importance`: {path!r} holds unknown parts {sorted(unknown)}; expected {PARTS}.")
        try:
            user_meta = json.loads(meta.get("metadata", "{}"))
        except json.JSONDecodeError:
            user_meta = {}
        user_meta["source"] = path
        return cls(**tensors, normalized=meta.get("normalized") == "true", metadata=user_meta, units=units or None)

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
            values = values.flatten(1) if values.dim() == 3 else values  # experts side by side
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


from .scales import kv_head_importance, mean_one_factor, module_scale, unit_keep  # noqa: E402  (re-exported)

__all__ = [
    "EXPERT_PARTS",
    "PARTS",
    "Importance",
    "kv_head_importance",
    "mean_one_factor",
    "module_scale",
    "normalize",
    "normalize_part",
    "resolve_importance",
    "unit_keep",
]
