"""Dropout on the attention probabilities (the authors' placement), and the attention kernel it needs.

The authors inject dropout on LLaMA's attention probabilities. Only eager attention computes them as a tensor; SDPA and
flash attention fuse softmax and matmul. `_ProbabilityDropout` hooks each decoder layer's attention module: while the
module runs, a `TorchFunctionMode` applies the estimator's seeded dropout to the output of its softmax (eager attention
calls exactly one). The count is checked after every forward pass, so an attention that computes no softmax (SDPA,
flash) or several is refused by name instead of estimating without the noise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..architectures import ModelLayout, base_of, text_config
from ..errors import CoFiTuneError

logger = logging.getLogger(__name__)

_SOFTMAXES = frozenset(
    {torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}
)  # the entry points an eager attention computes its probabilities with


class _SoftmaxDropout(TorchFunctionMode):
    """Active inside one attention module's forward: `drop` applied to every softmax output, and counted."""

    def __init__(self, drop: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.drop = drop
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))  # the mode is off inside its own handler: no recursion
        if func in _SOFTMAXES:
            self.calls += 1
            out = self.drop(out)  # [batch, heads, queries, keys]
        return out


class _ProbabilityDropout:
    """Hooks that put `drop` on the attention probabilities of every decoder layer; `check()` after each forward."""

    def __init__(self, model: nn.Module, layout: ModelLayout, drop: Callable):
        self.layers, self.modules = zip(*_attention_modules(model, layout))
        self.modes = [_SoftmaxDropout(drop) for _ in self.modules]
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for module, mode in zip(self.modules, self.modes):
            self.handles.append(module.register_forward_pre_hook(self._enter(mode)))
            self.handles.append(module.register_forward_hook(self._exit(mode), always_call=True))

    @staticmethod
    def _enter(mode: _SoftmaxDropout):
        def hook(module, args):
            mode.calls = 0
            mode.__enter__()

        return hook

    @staticmethod
    def _exit(mode: _SoftmaxDropout):
        def hook(module, args, output):
            mode.__exit__(None, None, None)

        return hook

    def check(self) -> None:
        """Raise unless each attention module computed exactly one softmax in the last forward pass."""
        for layer, module, mode in zip(self.layers, self.modules, self.modes):
            if mode.calls != 1:
                raise CoFiTuneError(
                    f"`attention_dropout='probabilities'`: the attention of layer {layer} "
                    f"({type(module).__name__}) computed {mode.calls} softmaxes in one forward pass; the dropout needs "
                    "exactly one, the attention probabilities of eager attention. Pass `attn_implementation='eager'`, "
                    "or `attention_dropout='head_output'` (dropout on each head's output, any kernel)."
                )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _attention_modules(model: nn.Module, layout: ModelLayout) -> list[tuple[int, nn.Module]]:
    """`(layer, attention module)` of each decoder layer with attention: the parent of each attention output
    projection the layout names (layers without attention, as in hybrids, have none)."""
    found = []
    for index, layer in enumerate(layout.layers):
        inners = dict.fromkeys(g.module.rpartition(".")[0] for g in layer.gates if g.kind == "heads")
        for inner in inners:
            if not inner:
                raise CoFiTuneError(
                    f"`attention_dropout='probabilities'` needs the attention module around the output projection "
                    f"of layer {index}, but its layout names the projection alone; pass "
                    "`attention_dropout='head_output'`."
                )
            found.append((index, base_of(model.get_submodule(layout.key(index, inner)))))
    if not found:
        raise CoFiTuneError(
            "`attention_dropout='probabilities'`: this model's decoder layers have no attention CoFiTune can read; "
            "pass `attention_dropout='head_output'`."
        )
    return found


def attention_kernel(model: nn.Module) -> str | None:
    """The attention implementation a transformers model runs (`"eager"`, `"sdpa"`, ...), None if it names none."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    for cfg in (text_config(config), config):
        impl = getattr(cfg, "_attn_implementation", None)
        if isinstance(impl, str):
            return impl
    return None


@contextlib.contextmanager
def attention_kernel_set(model: nn.Module, implementation: str | None) -> Iterator[None]:
    """Run the block with `model`'s attention kernel switched to `implementation` (None: as it is), then switch back."""
    before = attention_kernel(model)
    if implementation is None or implementation == before:
        yield
        return
    advice = (
        f"load the model with `attn_implementation={implementation!r}` (`from_pretrained(..., "
        f"attn_implementation={implementation!r})`), or pass `attn_implementation=None` to keep its {before!r} kernel"
    )
    if not hasattr(model, "set_attn_implementation"):
        raise CoFiTuneError(
            f"`attn_implementation={implementation!r}`: a {type(model).__name__} cannot switch its attention kernel "
            f"(no `set_attn_implementation`); {advice}."
        )
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError) as err:
        raise CoFiTuneError(f"`attn_implementation={implementation!r}`: {err}; {advice}.") from err
    try:
        if attention_kernel(model) != implementation:
            raise CoFiTuneError(
                f"`attn_implementation={implementation!r}`: {type(model).__name__} kept its {before!r} attention "
                f"(it cannot switch kernels after loading); {advice}."
            )
        logger.info(
            "importance: attention kernel %r for the estimate (the model's %r afterwards)", implementation, before
        )
        yield
    finally:
        if before is not None:
            model.set_attn_implementation(before)
