"""Finding the blocks of a decoder layer: attention, feed-forward networks, experts, and what CoFiTune leaves alone.

A block is recognised by its module's class name (`...Attention`, `...MLP`, `...Experts`, `...Mixer`), the way
transformers names them, or by the attribute names that hold FFNs (`mlp`, `feed_forward`, ...). Sequence mixers that
are not softmax attention (Mamba, linear attention, gated delta nets, recurrent and convolution blocks) and
cross-attention to an encoder are found so that they can be named in messages, and are never trained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import _compat
from . import table
from .layout import full_shape

MIXERS = (
    ("mamba", re.compile(r"(Mixer|MambaLayer|SSM|Ssm)$")),
    ("linear_attention", re.compile(r"(DeltaNet|LinearAttention|LightningAttention|DeltaAttention|Retention)$")),
    ("recurrent", re.compile(r"(RecurrentBlock|Rglru|RGLRU|LSTMLayer|LSTMBlock|RwkvSelfAttention)$")),
    ("convolution", re.compile(r"(ShortConv|Conv|Hyena)$")),
)
FFN_CLASS = re.compile(
    r"(MLP|Mlp|FeedForward|Feedforward|FFN|Ffn|FFNBlock|MoE|Moe|MoeBlock|MoEBlock|DenseActDense|GLU|SharedExperts?)$"
)
ATTENTION = re.compile(r"(Attention|MLA|Attn|AttentionBlock)$")
ROUTER_CLASS = re.compile(r"Router|TopK|Gating|Gate$")
CROSS_NAMES = ("encoder_attn", "cross_attn", "crossattention", "cross_attention", "encdec_attention")
FFN_NAMES = ("mlp", "feed_forward", "ffn", "ff", "mlp_block", "shared_mlp", "shared_expert", "shared_experts", "moe",
             "block_sparse_moe", "mlps", "channel_mix")  # fmt: skip
#: Layer-level linears that form an FFN without a container (OPT/BART `fc1`/`fc2`, BERT `intermediate`/`output`).
LOOSE_FFN_PAIRS = (("fc1", "fc2"), ("intermediate.dense", "output.dense"), ("intermediate", "output"))


def is_linear_like(module: nn.Module) -> bool:
    """An `nn.Linear`/`Conv1D`, a module with `in_features`/`out_features`, or a leaf quantized by some library (so
    that it can be refused by name, not skipped)."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if isinstance(base, (nn.Linear, Conv1D)):
        return True
    if isinstance(getattr(base, "in_features", None), int) and isinstance(getattr(base, "out_features", None), int):
        return True
    if base._modules or not (base._parameters or base._buffers):
        return False
    weight = base._parameters.get("weight")
    if type(weight) is nn.Parameter and weight.is_floating_point() and not ({"qweight", "W_q"} & set(base._buffers)):
        return False  # a plain floating-point leaf (a norm, an embedding)
    return _compat.quantization_of(base) is not None


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """`(in_features, out_features)` of a linear-like module (a PEFT tuner layer: of its base layer)."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if isinstance(base, Conv1D):
        shape = full_shape(base.weight)
        return int(shape[0]), int(shape[1])
    in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if isinstance(in_f, int) and isinstance(out_f, int):
        return in_f, out_f
    shape = full_shape(base.weight)
    return int(shape[1]), int(shape[0])


def unwrap(module: nn.Module) -> nn.Module:
    """The module a CoFiTune/PEFT wrapper holds (a tuner layer around an experts module is transparent)."""
    while isinstance(module, BaseTunerLayer) and not is_linear_like(module):
        module = module.get_base_layer()
    return module


def expert_params(module: nn.Module) -> dict[str, object]:
    """The fused expert weights a module owns directly: parameters of 3 dims, or DBRX's folded 2-D ones."""
    module = unwrap(module)
    name = type(module).__name__
    if "Expert" not in name:
        return {}
    out = {}
    for pname, param in module.named_parameters(recurse=False):
        if len(full_shape(param)) == 3 or (name in table.FOLDED_EXPERTS and len(full_shape(param)) == 2):
            out[pname] = param
    return out


class Unreadable(Exception):
    """A block whose layout cannot be read; the message says what was found."""


def check(actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise Unreadable(f"{what}: expected {expected}, the weight has {actual}")


@dataclass
class Block:
    """One block of a layer: `kind` is `attention`, `cross_attention`, `ffn` or a mixer kind (`mamba`, ...)."""

    kind: str
    path: str
    module: nn.Module
    linears: dict[str, nn.Module] = field(default_factory=dict)  # path inside the block -> linear-like module
    experts: dict[str, dict[str, object]] = field(default_factory=dict)  # owner path inside the block -> params


def _classify(name: str, module: nn.Module, prefix: str = "") -> str | None:
    """The block kind of `module` from its class name, read without the model's own prefix first (Kimi-Linear's
    full attention is `KimiLinearAttention`, not a linear attention), then whole (`xLSTMLayer`)."""
    cls = type(unwrap(module)).__name__
    if name.rsplit(".", 1)[-1].lower() in CROSS_NAMES or "Cross" in cls:
        return "cross_attention"
    names = [cls[len(prefix) :]] if prefix and cls.startswith(prefix) and len(cls) > len(prefix) else []
    for candidate in (*names, cls):
        for kind, pattern in MIXERS:
            if pattern.search(candidate):
                return kind
        if FFN_CLASS.search(candidate):
            return "ffn"
        if ATTENTION.search(candidate):
            return "attention"
    if name.rsplit(".", 1)[-1] in FFN_NAMES:
        return "ffn"
    return None


def _walk(module: nn.Module, prefix: str = ""):
    """`(path, child)` for the children of `module`, looking through PEFT wrappers of non-linear modules."""
    for name, child in unwrap(module).named_children():
        if name == "base_layer":
            continue
        yield (f"{prefix}.{name}" if prefix else name), child


def _collect(block: Block, module: nn.Module, prefix: str, nested: list[Block], model_prefix: str = "") -> None:
    """Fill `block` with the linears and expert weights under `module`; FFN containers found inside become blocks of
    their own (`nested`: a MoE block's shared experts)."""
    params = expert_params(module)
    if params:
        block.experts[prefix] = params
        return
    for path, child in _walk(module, prefix):
        if ROUTER_CLASS.search(type(unwrap(child)).__name__):
            continue  # a router (and its own small MLP) is not trained
        if is_linear_like(child):
            block.linears[path] = child
            continue
        if expert_params(child):
            block.experts[path] = expert_params(child)
            continue
        kind = _classify(path, child, model_prefix)
        if block.kind == "ffn" and kind == "ffn" and not isinstance(unwrap(child), nn.ModuleList):
            sub = Block("ffn", path, child)
            nested.append(sub)
            _collect(sub, child, path, nested, model_prefix)
            continue
        _collect(block, child, path, nested, model_prefix)


def find_blocks(layer: nn.Module, model_prefix: str = "") -> tuple[list[Block], dict[str, nn.Module]]:
    """The blocks of a decoder layer, and the linears that lie outside every block (`loose`), by path.

    `model_prefix` is the model's class-name prefix (`"Llama"` of `LlamaForCausalLM`), read off its modules' names.
    """
    blocks: list[Block] = []
    loose: dict[str, nn.Module] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for path, child in _walk(module, prefix):
            if is_linear_like(child):
                loose[path] = child
                continue
            cls = type(unwrap(child)).__name__
            if cls.endswith("Norm") and not re.search(
                r"Attention|MLP|FFN", cls
            ):  # an adaptive norm's own small MLP is not the layer's FFN
                loose.update({f"{path}.{n}": m for n, m in child.named_modules() if n and is_linear_like(m)})
                continue
            kind = _classify(path, child, model_prefix)
            if kind is None or isinstance(unwrap(child), nn.ModuleList):
                if expert_params(child):
                    block = Block("ffn", path, child)
                    blocks.append(block)
                    _collect(block, child, path, blocks, model_prefix)
                else:
                    visit(child, path)
                continue
            block = Block(kind, path, child)
            blocks.append(block)
            nested: list[Block] = []
            _collect(block, child, path, nested, model_prefix)
            blocks.extend(nested)

    visit(layer, "")
    return blocks, loose


def model_prefix(model: nn.Module) -> str:
    """The class-name prefix of a model's own modules: `"KimiLinear"` of `KimiLinearForCausalLM`."""
    match = re.match(r"^(.+?)(For[A-Z]\w*|LMHeadModel|WithLMHead\w*|Model|Decoder)$", type(model).__name__)
    return match.group(1) if match else ""


def loose_ffn(loose: dict[str, nn.Module]) -> Block | None:
    """An FFN made of layer-level linears (OPT's `fc1`/`fc2`, BERT's `intermediate.dense`/`output.dense`)."""
    for up, down in LOOSE_FFN_PAIRS:
        if up in loose and down in loose:
            block = Block("ffn", "", None)
            block.linears = {up: loose.pop(up), down: loose.pop(down)}
            return block
    return None
