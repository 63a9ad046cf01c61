"""Quantized bases: bitsandbytes 4-bit (nf4, fp4, double quant) and 8-bit train a delta on CPU; every other
quantization library is refused by name."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from tiny_models import batch, tiny_model
from torch import nn

from cofitune_peft import CoFiTuneConfig, CoFiTuneError, CoFiTuneLayer, Importance
from cofitune_peft.architectures import dims_of

bnb = pytest.importorskip("bitsandbytes")

# bitsandbytes quantizes in blocks of 64 along the input features (and its CPU kernels need whole blocks)
L, D, INTER = 8, 64, 128
KINDS = {
    "nf4": {"bits": 4, "quant_type": "nf4", "double": False},
    "fp4": {"bits": 4, "quant_type": "fp4", "double": False},
    "nf4-double-quant": {"bits": 4, "quant_type": "nf4", "double": True},
    "int8": {"bits": 8},
}


def quantized_linear(linear: nn.Linear, bits: int, quant_type: str = "nf4", double: bool = False) -> nn.Module:
    """A bitsandbytes copy of `linear`, quantized on CPU the way `from_pretrained(quantization_config=...)` does."""
    out_features, in_features = linear.weight.shape
    has_bias = linear.bias is not None
    if bits == 4:
        q = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=has_bias,
            compute_dtype=torch.float32,
            quant_type=quant_type,
            compress_statistics=double,
        )
        q.weight = bnb.nn.Params4bit(
            linear.weight.data.clone(), requires_grad=False, quant_type=quant_type, compress_statistics=double
        )
    else:
        q = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def dense_model():
    return tiny_model(hidden_size=D, intermediate_size=INTER)


def quantized_model(kind: str):
    """A tiny Llama whose decoder-layer linears are bitsandbytes layers (embeddings and head stay fp32)."""
    spec = KINDS[kind]
    model = dense_model()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".layers." in name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantized_linear(module, **spec))
    setattr(model, f"is_loaded_in_{spec['bits']}bit", True)  # what from_pretrained sets; PEFT reads it
    return model.eval()


def importance() -> Importance:
    g = torch.Generator().manual_seed(1)
    return Importance(intermediate=torch.rand(L, INTER, generator=g), output=torch.rand(L, D, generator=g))


def train(pm, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    pm.train()
    losses = []
    for step in range(steps):
        x = batch(step, size=4)
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    pm.eval()
    return losses


def quantized_bytes(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype in (torch.uint8, torch.int8)}


def test_width_is_read_from_the_real_shape():
    model = quantized_model("nf4")
    assert model.model.layers[0].mlp.down_proj.weight.shape == (INTER * D // 2, 1)  # packed bytes
    assert dims_of(model).intermediate == INTER


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_zero_delta_is_the_quantized_model_and_training_moves_only_the_delta(kind):
    model = quantized_model(kind)
    x = batch(7)
    with torch.no_grad():
        reference = model(x).logits
    frozen = quantized_bytes(model)
    pm = get_peft_model(model, CoFiTuneConfig(layers=(2, 4), importance=importance()))
    with torch.no_grad():
        assert torch.equal(pm(x).logits, reference)
    layers = [m for m in pm.modules() if isinstance(m, CoFiTuneLayer)]
    assert len(layers) == 4
    for layer in layers:
        base = layer.get_base_layer()
        delta = layer.cofitune_delta["default"].weight
        assert type(base).__name__ == ("Linear4bit" if KINDS[kind]["bits"] == 4 else "Linear8bitLt")
        assert delta.dtype == torch.float32 and delta.requires_grad and not base.weight.requires_grad
        expected = (INTER, D) if base is pm.base_model.model.model.layers[2].mlp.up_proj.base_layer else None
        if expected:
            assert delta.shape == expected
    losses = train(pm)
    assert all(torch.isfinite(torch.tensor(losses)))
    for layer in layers:
        assert layer.cofitune_delta["default"].weight.abs().sum() > 0
    after = quantized_bytes(pm)
    assert frozen.keys() == {k.replace("base_model.model.", "").replace(".base_layer", "") for k in after}
    for key, value in after.items():
        assert torch.equal(value, frozen[key.replace("base_model.model.", "").replace(".base_layer", "")])


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_delta_gradient_matches_a_dense_model_of_the_dequantized_weights(kind):
    # the quantized base contributes exactly its dequantized weight, so the delta sees the same gradient
    quantized = quantized_model(kind)
    dense = dense_model()
    from cofitune_peft import _compat

    for name, module in quantized.named_modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            with torch.no_grad():
                dense.get_submodule(name).weight.copy_(_compat.dequantize_bnb(module))
    grads = []
    for model in (quantized, dense):
        torch.manual_seed(0)  # the same random deltas
        pm = get_peft_model(model, CoFiTuneConfig(layers=(2, 4), importance=importance(), init_weights=False))
        x = batch(3)
        # train mode: in eval mode without gradients bitsandbytes' CPU kernels compute in bf16/fp16 instead
        pm.train()(input_ids=x, labels=x).loss.backward()
        grads.append(pm.base_model.model.model.layers[2].mlp.down_proj.cofitune_delta["default"].weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["nf4-double-quant", "int8"])
def test_prepare_model_for_kbit_training_then_train(kind):
    model = prepare_model_for_kbit_training(quantized_model(kind))
    assert model.is_gradient_checkpointing
    pm = get_peft_model(model, CoFiTuneConfig(layers=(2, 4), importance=importance()))
    before = pm.base_model.model.model.layers[3].mlp.up_proj.cofitune_delta["default"].weight.clone()
    train(pm)
    after = pm.base_model.model.model.layers[3].mlp.up_proj.cofitune_delta["default"].weight
    assert not torch.equal(before, after)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_and_unload_requantizes_with_a_warning(kind):
    pm = get_peft_model(quantized_model(kind), CoFiTuneConfig(layers=(2, 4), importance=importance()))
    train(pm, lr=5e-2)
    x = batch(9)
    with torch.no_grad():
        unmerged = pm(x).logits
    with pytest.warns(UserWarning, match="rounds the weight to the quantization grid"):
        merged = pm.merge_and_unload(safe_merge=True)
    up = merged.model.layers[2].mlp.up_proj
    assert type(up).__name__ == ("Linear4bit" if KINDS[kind]["bits"] == 4 else "Linear8bitLt")
    assert not any(isinstance(m, CoFiTuneLayer) for m in merged.modules())
    with torch.no_grad():
        logits = merged(x).logits
    # the merged weight is rounded to the grid once more: close to the unmerged model, not equal (measured: nf4
    # 10%, int8 1% of the largest logit)
    bound = 0.2 if KINDS[kind]["bits"] == 4 else 0.03
    assert (logits - unmerged).abs().max() < bound * unmerged.abs().max()


def test_safe_merge_of_nan_into_a_quantized_base_is_refused():
    pm = get_peft_model(quantized_model("nf4"), CoFiTuneConfig(layers=(2, 3)))
    layer = pm.base_model.model.model.layers[2].mlp.up_proj
    with torch.no_grad():
        layer.cofitune_delta["default"].weight[0, 0] = float("nan")
    before = layer.get_base_layer().weight.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CoFiTuneError, match=re.escape("The adapter default seems to be broken")):
            layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before)


# ---------------------------------------------------------------------- other libraries: refused by name


def stand_in(module_path: str, class_name: str, base=nn.Module, **attrs):
    """A class named like another library's quantized layer, without importing that library."""
    cls = type(class_name, (base,), {"forward": lambda self, x: x})
    cls.__module__ = module_path
    instance = cls.__new__(cls)
    nn.Module.__init__(instance)
    for key, value in attrs.items():
        instance.register_buffer(key, value)
    return instance


def torchao_linear():
    linear = nn.Linear(D, INTER)
    cls = type("AffineQuantizedTensor", (torch.Tensor,), {})
    cls.__module__ = "torchao.dtypes.affine_quantized_tensor"
    del linear.weight
    linear.weight = torch.Tensor._make_subclass(cls, torch.zeros(INTER, D))
    return linear


def int8_linear():
    linear = nn.Linear(D, INTER)
    del linear.weight
    linear.weight = torch.zeros(INTER, D, dtype=torch.int8)
    return linear


def fp8_linear():
    linear = nn.Linear(D, INTER)
    del linear.weight
    linear.weight = torch.zeros(INTER, D).to(torch.float8_e4m3fn)
    return linear


PACKED = torch.zeros(4, 4, dtype=torch.int32)
OTHERS = {
    "GPTQ": lambda: stand_in("auto_gptq.nn_modules.qlinear.qlinear_cuda", "QuantLinear", qweight=PACKED),
    "GPTQ (gptqmodel)": lambda: stand_in("gptqmodel.nn_modules.qlinear.marlin", "MarlinQuantLinear", qweight=PACKED),
    "AWQ": lambda: stand_in("awq.modules.linear.gemm", "WQLinear_GEMM", qweight=PACKED),
    "HQQ": lambda: stand_in("hqq.core.quantize", "HQQLinear", W_q=PACKED),
    "EETQ": lambda: stand_in("eetq.modules.qlinear", "EetqLinear", weight=PACKED.to(torch.int8)),
    "torchao": torchao_linear,
    "an unknown quantization library (int8 weight)": int8_linear,
    "an unknown quantization library (float8 weight)": fp8_linear,
}


@pytest.mark.parametrize("library", sorted(OTHERS))
def test_other_quantized_layers_are_refused_by_name(library):
    model = dense_model()
    model.model.layers[2].mlp.up_proj = OTHERS[library]()
    name = library.split(" (")[0]
    with pytest.raises(CoFiTuneError, match=re.escape(f"quantized by {name}")) as err:
        get_peft_model(model, CoFiTuneConfig(layers=(2, 3)))
    message = str(err.value)
    assert "'model.layers.2.mlp.up_proj'" in message
    assert "bf16" in message and "bitsandbytes" in message
