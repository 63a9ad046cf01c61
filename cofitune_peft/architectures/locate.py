"""Finding the text decoder's layer list: the stack of layers whose output feeds the LM head.

Read from the model the way transformers' `get_decoder()` reads it, never matched by name anywhere in the model: a
multimodal model's vision or audio tower has layer lists of its own (`vision_tower.encoder.layers.<i>`), and their
projections must not be sized against (or trained with) the text model's units.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import CoFiTuneError
from .config_read import LAYERS, first_int, model_config, read

#: Path words of towers that do not feed the LM head.
TOWER_WORDS = (
    "vision", "visual", "image", "img", "audio", "speech", "video", "vqmodel", "vq_model", "projector", "connector",
    "resampler", "perceiver", "patch_embed", "depth_decoder",
)  # fmt: skip


def _is_tower(name: str) -> bool:
    parts = name.lower().split(".")
    return any(word in part for part in parts for word in TOWER_WORDS)


def _is_layer_list(module: nn.Module) -> bool:
    """A ModuleList of layers: non-empty, of modules with children and parameters (not of Linears or norms)."""
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    first = module[0]
    return any(True for _ in first.children()) and any(True for _ in first.parameters())


def _decoder_root(model: nn.Module) -> str | None:
    """The name of the module `model.get_decoder()` returns, when it is a submodule holding a layer list."""
    getter = read(model, "get_decoder")
    if not callable(getter):
        return None
    try:
        decoder = getter()
    except Exception:
        return None
    if not isinstance(decoder, nn.Module) or not any(_is_layer_list(m) for m in decoder.modules()):
        return None
    for name, module in model.named_modules():
        if module is decoder:
            return name
    return None


def layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every top-level layer list of `model` (not nested in another one's layers), `(name, list)`."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not _is_layer_list(module):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    return found


def find_decoder_layers(model: nn.Module, layers_pattern: str | None = None) -> tuple[str, nn.ModuleList]:
    """`(name, layers)` of the text decoder's layer list, or a `CoFiTuneError` that says what was found.

    With `layers_pattern` (the list's attribute name, `"layers"`, or a dotted path ending in it,
    `"model.language_model.layers"`), the list of that name; otherwise the one under `model.get_decoder()`, outside
    any vision/audio tower, of `num_hidden_layers` layers.
    """
    lists = layer_lists(model)
    if layers_pattern is not None:
        named = [(n, m) for n, m in lists if n == layers_pattern or n.endswith("." + layers_pattern)]
        if not named:  # the pattern may name a list nested inside another list's layers
            named = [
                (n, m)
                for n, m in model.named_modules()
                if isinstance(m, nn.ModuleList)
                and len(m)
                and (n == layers_pattern or n.endswith("." + layers_pattern))
            ]
        text = [(n, m) for n, m in named if not _is_tower(n)] or named
        if len(text) == 1:
            return text[0]
        if not text:
            raise CoFiTuneError(
                f"`layers_pattern`={layers_pattern!r} names no layer list of this {type(model).__name__}; its layer "
                f"lists are {[n for n, _ in lists] or 'none'}. Pass the name of the one that holds the decoder layers."
            )
        raise CoFiTuneError(
            f"`layers_pattern`={layers_pattern!r} matches several layer lists {[n for n, _ in text]}; pass the full "
            f"dotted name of the one that feeds the LM head, e.g. layers_pattern={text[0][0]!r}."
        )
    root = _decoder_root(model)
    candidates = [(n, m) for n, m in lists if not _is_tower(n)]
    if root:
        under = [(n, m) for n, m in candidates if n.startswith(root + ".")]
        candidates = under or candidates
    expected = first_int(model_config(model), LAYERS)
    if expected is not None and len(candidates) > 1:
        candidates = [(n, m) for n, m in candidates if len(m) == expected] or candidates
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CoFiTuneError(
            f"no decoder-layer list found in this {type(model).__name__} (a ModuleList of layers outside any vision "
            "or audio tower); CoFiTune trains decoder layers. Pass `layers_pattern` naming the list if it has one."
        )
    names = ", ".join(f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in candidates)
    raise CoFiTuneError(
        f"this {type(model).__name__} has several stacks of layers ({names}) and CoFiTune cannot tell which one "
        f"feeds the LM head; pass `layers_pattern` with its full name, e.g. layers_pattern={candidates[-1][0]!r}."
    )


def layer_index_pattern(layers_path: str) -> re.Pattern:
    """A regex that finds `<layers_path>.<i>` in a module key (also under a `base_model.model.` prefix)."""
    return re.compile(rf"(?:^|\.){re.escape(layers_path)}\.(\d+)(?:\.|$)" if layers_path else r"^(\d+)(?:\.|$)")
