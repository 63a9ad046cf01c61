"""Gradient checkpointing and backward truncation: keep the layers below the window out of the backward pass.

Trainer and TRL call `enable_input_require_grads()` whenever PEFT and gradient checkpointing meet; it makes the
embeddings' output require grad and so drags every decoder layer into the backward pass, although CoFiTune
(arXiv 2404.10306) trains only a window of layers. The forward pre-hook here undoes it (see `fix_input_grads`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import _compat
from .architectures import find_decoder_layers
from .errors import CoFiTuneError

logger = logging.getLogger(__name__)


def fix_input_grads(tuner, module: nn.Module, args, kwargs):
    """Forward pre-hook: undo `enable_input_require_grads`, which drags every layer into the backward pass.

    Trainer and TRL call it whenever PEFT and gradient checkpointing meet. With non-reentrant checkpointing (the
    transformers default) or none, autograd needs no help, so the hook is simply removed. Reentrant checkpointing does
    need a grad-requiring input to a checkpointed layer that holds trainable weights; we give it to the lowest such
    layer instead of to the embeddings, so the layers below it still stay out of the backward pass.
    """
    if not module.training or tuner._cofitune_reversible:
        return None
    found = _compat.input_grad_hooks(tuner._cofitune_embeddings)
    if not found:
        return None
    configs = [tuner.peft_config[a] for a in tuner.active_adapters if a in tuner.peft_config]
    if not configs or not all(getattr(c, "fix_input_grads", False) for c in configs):
        return None
    trainable_layers = lowest_trainable_layer(tuner)
    if trainable_layers is None:
        return None
    lowest, layer_module = trainable_layers
    reentrant = _compat.reentrant_checkpointing(module)
    _compat.remove_input_grad_hooks(module, found)
    if reentrant and tuner._cofitune_window_hook is None:
        tuner._cofitune_window_hook = layer_module.register_forward_pre_hook(inputs_require_grad, with_kwargs=True)
        logger.info(
            "CoFiTune: removed the input-require-grads hook; reentrant checkpointing gets a grad-requiring input at "
            "layer %d instead, so layers below it stay out of the backward pass.",
            lowest,
        )
    else:
        logger.info(
            "CoFiTune: removed the input-require-grads hook; layers below %d stay out of the backward pass.", lowest
        )
    return None


def inputs_require_grad(module, args, kwargs):
    def mark(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.requires_grad:
            return t.detach().requires_grad_(True)
        return t

    if not (module.training and torch.is_grad_enabled()):
        return None
    if args:
        return (mark(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        kwargs = dict(kwargs, hidden_states=mark(kwargs["hidden_states"]))
    return args, kwargs


def lowest_trainable_layer(tuner) -> tuple[int, nn.Module] | None:
    patterns = {getattr(cfg, "layers_pattern", None) for cfg in tuner.peft_config.values()}
    for pattern in sorted(patterns, key=str):
        try:
            _, layers = find_decoder_layers(tuner.model, pattern)
        except CoFiTuneError:
            continue
        for index, layer in enumerate(layers):
            if any(p.requires_grad for p in layer.parameters()):
                return index, layer
    return None
