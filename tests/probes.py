"""Probes that check a layout against what the model computes, not against its shapes.

A layout says which rows of which weight feed which unit. These probes change exactly the rows it gives one unit and
watch where the change lands: rows of query head j must change only head j's slice of the attention output
projection's input (key/value head g: only the query heads of its group), rows of FFN unit u only column u of the down
projection's input, and an up row enters that column linearly while a gate row does not. For fused experts: rows of an
expert's unit u must not reach the output once that unit's column of the expert's down weight is zero. A wrong layout
(a fused projection read in the wrong order) fails these probes even when every size adds up.
"""

from __future__ import annotations

import torch
from torch import nn

from cofitune_peft.architectures import ModelLayout, base_of, param_owner


def _rows(module_layout, role: str, unit: int) -> torch.Tensor:
    """A bool mask of the rows (along the layout's axis) that play `role` for unit `unit` of their part."""

    def values(s):
        units = torch.arange(s.first, s.first + s.count, dtype=torch.float32) if s.group == 1 else (
            torch.arange(s.count, dtype=torch.float32) * s.group + s.first
        )  # fmt: skip
        hit = (
            (units <= unit) & (unit < units + s.group)
            if role in s.roles and s.part
            else torch.zeros(s.count, dtype=torch.bool)
        )
        return hit.float()

    return module_layout.expand(values) > 0


def _capture(module: nn.Module, run) -> torch.Tensor:
    captured = []
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])


def _perturb(module: nn.Module, rows: torch.Tensor, axis_dim: int, scale: float = 1.0, param: str = "weight"):
    owner, attr = param_owner(base_of(module), param)
    weight = getattr(owner, attr)
    original = weight.detach().clone()
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * scale
    mask = rows.view(-1, 1) if axis_dim == 0 else rows.view(1, -1)
    with torch.no_grad():
        weight.add_(noise * mask)
    return lambda: weight.data.copy_(original)


def probe_layer(model: nn.Module, layout: ModelLayout, index: int, ids: torch.Tensor) -> list[str]:
    """Problems found in layer `index` of `layout` (an empty list when every probe lands where the layout says)."""
    from cofitune_peft.architectures import weight_axis

    layer = layout.layers[index]
    problems = []
    run = lambda: model(input_ids=ids)  # noqa: E731
    for gate in layer.gates:
        target = base_of(model.get_submodule(layout.key(index, gate.module)))
        if gate.kind not in ("heads", "ffn"):
            continue
        reference = _capture(target, run)
        if gate.kind == "heads":
            for module_layout in layer.modules:
                if module_layout.param or module_layout.axis != "out":
                    continue
                for role in sorted(module_layout.roles & {"q", "k", "v"}):
                    segs = [s for s in module_layout.segments if role in s.roles and s.part == "heads"]
                    if not any(gate.first <= s.first < gate.first + gate.count for s in segs):
                        continue
                    seg = segs[0]
                    unit = seg.first + (seg.count - 1) * seg.group  # the block's last (key/value) head
                    rows = _rows(module_layout, role, unit)
                    module = model.get_submodule(layout.key(index, module_layout.name))
                    restore = _perturb(module, rows, weight_axis(base_of(module), "out"))
                    changed = (_capture(target, run) - reference).abs().view(-1, gate.count, gate.width)
                    restore()
                    heads = {h + gate.first for h in range(gate.count) if changed[:, h].max() > 1e-6}
                    allowed = set(range(unit, unit + seg.group))
                    if not heads or not heads <= allowed:
                        problems.append(
                            f"{module_layout.name}: rows of {role} head {unit} changed heads {sorted(heads)}, "
                            f"expected within {sorted(allowed)}"
                        )
        else:
            unit = gate.first + gate.count - 1
            gated = any(
                "gate" in s.roles and s.part == "intermediate" and s.first <= unit < s.first + s.count
                for m in layer.modules
                for s in m.segments
            )
            for module_layout in layer.modules:
                roles = module_layout.roles & {"up", "gate"}
                if module_layout.param or not roles:
                    continue
                if not any(
                    s.part == "intermediate" and s.first <= unit < s.first + s.count for s in module_layout.segments
                ):
                    continue
                module = model.get_submodule(layout.key(index, module_layout.name))
                for role in sorted(roles):
                    rows = _rows(module_layout, role, unit)
                    deltas = []
                    for scale in (0.05, 0.1):  # small: clamped SwiGLUs (DeepSeek-V4) stay linear in `up`
                        restore = _perturb(module, rows, weight_axis(base_of(module), "out"), scale)
                        deltas.append(_capture(target, run) - reference)
                        restore()
                    cols = {c for c in range(deltas[0].shape[-1]) if deltas[0][:, c].abs().max() > 1e-9}
                    if cols != {unit - gate.first}:
                        problems.append(
                            f"{module_layout.name}: {role} rows of unit {unit} changed columns {sorted(cols)}"
                        )
                        continue
                    col = unit - gate.first
                    first, second = deltas[0][:, col], deltas[1][:, col]
                    linear = torch.allclose(second, 2 * first, rtol=1e-3, atol=1e-4 * float(first.abs().max()))
                    if gated and linear != (role == "up"):
                        problems.append(
                            f"{module_layout.name}: rows labelled {role} enter unit {unit} {'linearly' if linear else 'non-linearly'}"
                        )
    return problems
