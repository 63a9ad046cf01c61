"""The per-row scales of the soft mask: `1 - I` of the unit each row (or column) of a trained weight feeds.

CoFiTune (Zhang et al., ACL 2024 Findings, arXiv 2404.10306) scales each trained row's change by `1 - I`: `up` and
`gate` rows by the intermediate unit's importance, `down` rows by the output feature's, `q`/`k`/`v` rows by their
head's (a key/value head by the most important query head it serves), `o` columns by their head's, and an expert's
rows by that expert's units. The row-to-unit map comes from the layout (`architectures.ModuleLayout`).
"""

from __future__ import annotations

import torch

from .architectures import EXPERT_PARTS, ModuleLayout, Segment


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


def unit_keep(importance, layer: int, segment: Segment) -> torch.Tensor | None:
    """`1 - I` for the units of `segment` in `layer` (`[count]`, or `[experts, count]` for the experts' parts), or
    None when the importance does not cover them."""
    if importance is None or segment.part is None:
        return None
    values = getattr(importance, segment.part, None)
    if values is None:
        return None
    row = values[layer].float()  # [units] or [experts, units]
    row = row[..., segment.first : segment.first + segment.count * segment.group]
    if segment.group > 1:
        row = row.reshape(*row.shape[:-1], segment.count, segment.group).amax(dim=-1)
    return 1.0 - row


def module_scale(importance, layer: int, layout: ModuleLayout) -> tuple[torch.Tensor, list[str]]:
    """The soft-mask factor of every row (or column) of one weight, and the parts the importance did not cover.

    Returns:
        `(scale, uncovered)`: `scale` is `[size]` (or `[experts, size]` for a routed expert weight) with values in
        [0, 1]; `uncovered` lists the parts that got scale 1 because the importance has no values for them.
    """
    lead = (layout.experts,) if layout.experts > 1 and any(s.part in EXPERT_PARTS for s in layout.segments) else ()
    uncovered: list[str] = []

    def values(segment: Segment) -> torch.Tensor:
        keep = unit_keep(importance, layer, segment)
        if keep is None:
            if importance is not None and segment.part is not None and segment.part not in uncovered:
                uncovered.append(segment.part)
            return torch.ones(*lead, segment.count)
        return keep.expand(*lead, segment.count) if keep.dim() < len(lead) + 1 else keep

    return layout.expand(values), uncovered


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
