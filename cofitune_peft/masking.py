"""Pure functions: raw importance -> normalised importance -> per-row scale of a trained weight.

Fine-SoftMask (Zhang et al., "Balancing Speciality and Versatility", ACL 2024 Findings, arXiv 2404.10306) scales the
change of each trained weight row by (1 - I) of the unit that row feeds, with I the unit's importance for versatility.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .architectures import Dims, ModuleLayout, segment_widths

if TYPE_CHECKING:
    from .importance import Importance


def normalize(raw: torch.Tensor) -> torch.Tensor:
    """Per-layer `|tanh((I - mean) / std)|`, in [0, 1) (the authors' normalisation).

    A layer whose raw values are all equal carries no ranking, so it maps to 0 (no protection).

    Args:
        raw (`torch.Tensor`): `[layers, units]`.
    """
    raw = raw.double()
    mean = raw.mean(dim=1, keepdim=True)  # [layers, 1]
    std = raw.std(dim=1, keepdim=True, unbiased=True) if raw.shape[1] > 1 else torch.zeros_like(mean)
    z = torch.where(std > 0, (raw - mean) / std.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(raw))
    return torch.tanh(z).abs().float()  # [layers, units]


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
