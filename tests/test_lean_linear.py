"""The lean masked linear (`_MaskedLinear`) against the naive `F.linear(x, W0 + f * Delta)`, its saved tensors, and
mixed-adapter batches at the layer level."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from cofitune_peft import CoFiTuneError
from cofitune_peft.layer import Linear

IN, OUT = 24, 40


def make_layer(kind: str, mode: str, dtype: torch.dtype, delta_dtype: torch.dtype, adapters=("a",), seed=0):
    """A wrapped layer with random W0, bias, deltas, soft-mask scales and a few frozen rows per adapter."""
    g = torch.Generator().manual_seed(seed)
    if kind == "conv1d":
        base = Conv1D(OUT, IN)  # weight [in, out]
        axis, size = "out", OUT
    else:
        base = nn.Linear(IN, OUT, bias=True)
        axis, size = ("in", IN) if kind == "linear-in" else ("out", OUT)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g))
        base.bias.copy_(torch.randn(base.bias.shape, generator=g))
    base = base.to(dtype).requires_grad_(False)
    layer = None
    for name in adapters:
        scale = torch.rand(size, generator=g)
        rows = (torch.rand(size, generator=g) > 0.2).float()
        kwargs = {"axis": axis, "scale": scale, "rows": rows, "mode": mode, "init_weights": False}
        if layer is None:
            layer = Linear(base, name, **kwargs)
        else:
            layer.update_layer(name, **kwargs)
    for name in adapters:
        delta = layer.cofitune_delta[name]
        delta.to(delta_dtype)
        with torch.no_grad():
            delta.weight.normal_(0.0, 0.5, generator=g)
    layer.set_adapter(list(adapters))
    return layer


def naive_forward(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    """The forward of cofitune-peft 0.1: the combined weight as an autograd tensor, kept by F.linear for backward."""
    base = layer.get_base_layer()
    weight = base.weight
    for name in layer.active_adapters:
        weight = weight + layer.get_delta_weight(name).to(weight.dtype)
    if layer.is_conv1d:
        out = torch.addmm(base.bias, x.view(-1, x.size(-1)).to(weight.dtype), weight)
        return out.view(*x.shape[:-1], weight.shape[1])
    autocast = torch.is_autocast_enabled("cpu")
    return F.linear(x if autocast else x.to(weight.dtype), weight, base.bias)


def run(layer, forward, x, grad, autocast: bool):
    for delta in layer.cofitune_delta.values():
        delta.weight.grad = None
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = forward(layer, x)
    y.backward(grad.to(y.dtype))
    grads = {name: d.weight.grad.clone() for name, d in layer.cofitune_delta.items()}
    return y.detach(), x.grad, grads


# (base dtype, delta dtype, autocast): bf16 with an fp32 delta is what PEFT's `cast_adapter_dtype` leaves
PRECISIONS = {
    "fp32": (torch.float32, torch.float32, False),
    "bf16": (torch.bfloat16, torch.bfloat16, False),
    "bf16-base-fp32-delta": (torch.bfloat16, torch.float32, False),
    "fp32-autocast-bf16": (torch.float32, torch.float32, True),
}


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("adapters", [("a",), ("a", "b")], ids=["one", "two"])
@pytest.mark.parametrize("kind", ["linear-out", "linear-in", "conv1d"])
@pytest.mark.parametrize("mode", ["update", "gradient", "none"])
def test_matches_naive_forward_and_backward(mode, kind, adapters, precision):
    dtype, delta_dtype, autocast = PRECISIONS[precision]
    layer = make_layer(kind, mode, dtype, delta_dtype, adapters)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, IN, generator=g).to(dtype)
    grad = torch.randn(3, 5, OUT, generator=g)
    y_ref, gx_ref, gd_ref = run(layer, naive_forward, x, grad, autocast)
    y, gx, gd = run(layer, Linear.forward, x, grad, autocast)
    # forward and input gradient: the same ops, bit for bit
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    assert gx.dtype == gx_ref.dtype and torch.equal(gx, gx_ref)
    # the delta gradient: the same product (input^T @ grad) and the same casts, also bit for bit on CPU
    for name in adapters:
        assert gd[name].dtype == gd_ref[name].dtype
        assert torch.equal(gd[name], gd_ref[name])
        assert (gd[name].abs().sum(layer.cofitune_axis[name] ^ 1) > 0).any()


def test_gradient_modes_scale_the_delta_gradient_per_row():
    # all-ones input gradient: the delta's gradient is W's gradient times the backward scale, row by row
    for mode in ("update", "gradient", "none"):
        layer = make_layer("linear-out", mode, torch.float32, torch.float32)
        x = torch.randn(4, IN)
        layer(x).sum().backward()
        expected = torch.ones(4, OUT).t() @ x * layer.gradient_scale("a").unsqueeze(1)
        torch.testing.assert_close(layer.cofitune_delta["a"].weight.grad, expected)


def saved_during(fn):
    """The tensors autograd saves for backward while `fn` runs: (storage pointer, bytes)."""
    saved = []

    def pack(t):
        saved.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("kind", ["linear-out", "conv1d"])
def test_saved_tensors_hold_no_weight_sized_copy(kind):
    layer = make_layer(kind, "update", torch.float32, torch.float32, adapters=("a", "b"))
    base = layer.get_base_layer().weight
    own = {base.untyped_storage().data_ptr()} | {
        d.weight.untyped_storage().data_ptr() for d in layer.cofitune_delta.values()
    }
    weight_bytes = base.untyped_storage().nbytes()
    x = torch.randn(2, 3, IN, requires_grad=True)

    _, saved = saved_during(lambda: layer(x))
    assert any(ptr in own for ptr, _ in saved)  # W0 and the deltas, by reference
    assert [b for ptr, b in saved if b >= weight_bytes and ptr not in own] == []

    _, naive = saved_during(lambda: naive_forward(layer, x))  # the old path keeps W0 + f * Delta alive
    assert [b for ptr, b in naive if b >= weight_bytes and ptr not in own] == [weight_bytes]


def test_frozen_delta_saves_no_input():
    layer = make_layer("linear-out", "update", torch.float32, torch.float32)
    layer.requires_grad_(False)
    x = torch.randn(2, 3, IN, requires_grad=True)
    _, saved = saved_during(lambda: layer(x))
    assert x.untyped_storage().data_ptr() not in {ptr for ptr, _ in saved}


# ---------------------------------------------------------------------- mixed-adapter batches


def test_mixed_batch_routes_rows_to_their_adapter():
    layer = make_layer("linear-out", "update", torch.float32, torch.float32, adapters=("a", "b")).eval()
    x = torch.randn(5, 3, IN)
    names = ["a", "__base__", "b", "a", "other"]
    with torch.no_grad():
        expected = {}
        for name in ("a", "b"):
            layer.set_adapter(name)
            expected[name] = layer(x)
        base = layer.get_base_layer()(x)
        out = layer(x, adapter_names=names)
    for row, name in enumerate(names):
        # "other" is an adapter this module does not carry: its rows use the base weights, as in PEFT LoRA
        torch.testing.assert_close(out[row], expected[name][row] if name in expected else base[row])


def test_mixed_batch_is_refused_in_training_and_when_merged():
    layer = make_layer("linear-out", "update", torch.float32, torch.float32, adapters=("a", "b"))
    x = torch.randn(2, IN)
    layer.train()
    with pytest.raises(CoFiTuneError, match="training mode"):
        layer(x, adapter_names=["a", "b"])
    with torch.no_grad():
        layer(x, adapter_names=["a", "b"])  # training mode without gradients is inference
    layer.eval()
    with pytest.raises(CoFiTuneError, match="one entry per batch row"):
        layer(x, adapter_names=["a"])
    layer.merge(adapter_names=["a"])
    with pytest.raises(CoFiTuneError, match="merged"):
        layer(x, adapter_names=["a", "b"])


def test_safe_merge_of_nan_uses_peft_wording():
    layer = make_layer("linear-out", "update", torch.float32, torch.float32)
    with torch.no_grad():
        layer.cofitune_delta["a"].weight[0, 0] = float("nan")
    before = layer.get_base_layer().weight.clone()
    peft_wording = re.escape("NaNs detected in the merged weights. The adapter a seems to be broken")
    with pytest.raises(CoFiTuneError, match=peft_wording):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before) and not layer.merged
