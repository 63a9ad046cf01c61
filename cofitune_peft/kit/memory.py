"""Peak training memory per GPU, estimated from a model's shapes: CoFiTune vs LoRA vs QLoRA vs full fine-tuning vs
freeze tuning (the same window's weights trained in place, as LLaMA-Factory's freeze tuning and Axolotl's
`unfrozen_parameters` do).

CoFiTune (arXiv 2404.10306) trains the FFN up/down projections of a window of decoder layers; layers below the window
stay out of the backward pass, which is where its activation memory comes from. This module counts every term of a
training step's peak from the real module shapes of a model built on the meta device (no weights are loaded):

    peak = max(backward start, optimizer step) + overhead
    backward start = base weights + trainable weights + optimizer states + buffers + activations + logits + transient
    optimizer step = base weights + trainable weights + optimizer states + buffers + gradients + optimizer temporaries

Each term is a method of `MemoryModel` with its formula. The per-layer activation counts were read off the tensors
autograd saves (a `saved_tensors_hooks` probe on Llama-shaped layers in fp32 and bf16, torch 2.13, transformers 5,
SDPA attention); the masked linear is modelled in its lean form (it keeps no weight-sized tensor from forward to
backward, only the input it needs for the delta's gradient). See docs/memory.md for the validation.

Example:

```python
>>> from cofitune_peft.kit.memory import KNOWN_SHAPES, estimate_training_memory
>>> est = estimate_training_memory(KNOWN_SHAPES["smollm2-135m"], "cofitune", batch=4, seq_len=256, dtype="float32")
>>> est.layers_in_backward, est.num_layers
(23, 30)
```
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cofitune_peft import CoFiTuneError

from .memory_optim import DEVICES, LOSSES, OptimizerSpec, gradient_bytes, loss_bytes, state_bytes
from .memory_optim import temporary_bytes as optimizer_temporary_bytes
from .memory_shapes import (  # noqa: F401  (re-exported: the memory model's public names)
    KNOWN_SHAPES,
    CoFiTunePlan,
    Shapes,
    _decoder_layers,
    cofitune_plan,
    load_config,
    meta_model,
)

GIB = 1024**3
METHODS = ("cofitune", "lora", "qlora", "full", "freeze")
# methods whose trainable tensors are the plan's window modules (CoFiTune's deltas, or the freeze peer's weights)
WINDOW_METHODS = ("cofitune", "freeze")
MASK_MODES = ("update", "gradient", "none")
BASE_QUANTS = ("none", "4bit", "8bit")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# CUDA context (~0.5 GiB on an H100 with torch 2.x), cuBLAS/cuDNN workspaces and caching-allocator slack. Not part of
# torch.cuda.max_memory_allocated; a stated constant, not a measurement. 0 on CPU.
CUDA_OVERHEAD_BYTES = 1 * GIB
# bitsandbytes nf4 with double quantisation: 4 bits a weight, one 8-bit absmax per 64 weights, one fp32 constant per
# 256 absmax values.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# LLM.int8: one byte a weight plus an fp32 scale per output row (added per module).
INT8_BYTES_PER_PARAM = 1.0
_ATTN_IN = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn")
_MLP_IN = ("gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "dense_h_to_4h", "w1", "w3")


def _dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPE_BYTES:
        raise CoFiTuneError(f"`dtype` must be one of {sorted(DTYPE_BYTES)} (or bf16/fp16/fp32), got {dtype!r}.")
    return name


@dataclass
class MemoryEstimate:
    """The result of `estimate_training_memory`: bytes per component, the two phases and the peak."""

    method: str
    settings: dict
    components: dict[str, float]  # bytes
    phases: dict[str, float]  # bytes
    peak_bytes: float  # with the overhead
    peak_allocated_bytes: float  # without it: what torch.cuda.max_memory_allocated measures
    trainable_params: int
    total_params: int
    layers_in_backward: int
    num_layers: int

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def fits(self, gpu_gib: float) -> bool:
        return self.peak_bytes <= gpu_gib * GIB

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_gib": self.peak_gib}


class MemoryModel:
    """The terms of the estimate for one model, method and setting. All sizes are in bytes; `N = batch * seq_len`
    tokens, `a` = activation bytes (the dtype's), `c` = trainable-parameter bytes, `h, i, q = heads * head_dim,
    kv = kv_heads * head_dim, nh` from the shapes, `V` the vocabulary."""

    def __init__(self, shapes: Shapes, method: str, *, batch, seq_len, dtype, optimizer, base_quant, checkpointing,
                 mask_mode, lora_rank, trainable_dtype, plan=None, device="cuda", loss="transformers",
                 input_require_grads=False):  # fmt: skip
        self.s, self.method, self.plan = shapes, method, plan
        self.tokens = batch * seq_len
        self.a = DTYPE_BYTES[dtype]
        self.c = DTYPE_BYTES[trainable_dtype] if method not in ("full", "freeze") else self.a
        self.spec = optimizer if isinstance(optimizer, OptimizerSpec) else OptimizerSpec(optimizer)
        self.base_quant, self.checkpointing = base_quant, checkpointing
        self.mask_mode, self.rank, self.device, self.loss = mask_mode, lora_rank, device, loss
        self.input_require_grads = input_require_grads

    # ---- parameters --------------------------------------------------------------------------------------------
    def trainable_params(self) -> int:
        """full: every parameter; LoRA/QLoRA: `r * (in + out)` per nn.Linear of the decoder layers ("all-linear");
        CoFiTune: the wrapped modules' full-rank deltas (`in * out` each), from the real plan."""
        if self.method == "full":
            return self.s.total_params
        if self.method in ("lora", "qlora"):
            return sum(self.rank * (i + o) for lin in self.s.linears for _, i, o in lin)
        return self.plan[0]

    def trainable_tensors(self) -> list[tuple[int, int]]:
        """`(rows, cols)` of each trained tensor (what per-tensor optimizer terms need): the window's modules
        (CoFiTune, freeze), LoRA's `A [r, in]` and `B [out, r]` per linear, or every weight (full: the decoder
        linears, the embeddings, an untied LM head, the rest as one vector)."""
        s = self.s
        if self.method in WINDOW_METHODS:
            return list(self.plan.tensors)
        if self.method in ("lora", "qlora"):
            return [t for lin in s.linears for _, i, o in lin for t in ((self.rank, i), (o, self.rank))]
        out = [(o, i) for lin in s.linears for _, i, o in lin]
        rest = s.total_params - s.layer_linear_params
        heads = 2 if rest >= 2 * s.vocab * s.hidden else 1
        out += [(s.vocab, s.hidden)] * heads
        return [*out, (rest - heads * s.vocab * s.hidden, 1)]

    def base_weights(self) -> float:
        """Unquantised: `total_params * a`. 4-bit: decoder-layer linears at `NF4_BYTES_PER_PARAM` (0.516 B, nf4 +
        double-quant constants), 8-bit: at 1 B + 4 B per output row; embeddings, norms and lm_head stay at `a`."""
        if self.base_quant == "none":
            return self.s.total_params * self.a
        rest = (self.s.total_params - self.s.layer_linear_params) * self.a
        if self.base_quant == "4bit":
            return rest + self.s.layer_linear_params * NF4_BYTES_PER_PARAM
        rows = sum(o for lin in self.s.linears for _, _, o in lin)
        return rest + self.s.layer_linear_params * INT8_BYTES_PER_PARAM + 4 * rows

    def trainable_weights(self) -> float:
        """PEFT methods: `trainable * c` (PEFT's `autocast_adapter_dtype` keeps adapters in fp32 by default;
        `CoFiTuneConfig.delta_dtype` sets CoFiTune's); full fine-tuning and freeze tuning: 0 (they are base weights)."""
        return 0 if self.method in ("full", "freeze") else self.trainable_params() * self.c

    def gradients(self) -> float:
        """One gradient per trainable parameter, in its dtype, `trainable * c`; with the step fused into the backward
        pass only the largest tensor's (`memory_optim.gradient_bytes`)."""
        return gradient_bytes(self.spec, self.trainable_tensors(), self.c)

    def optimizer_states(self) -> float:
        """The moments (`memory_optim.state_bytes`): AdamW two in the parameter dtype, `2 * c * trainable`; 8-bit
        (bitsandbytes, or `CoFiTuneAdamW(state_dtype="int8")`) `1 + 4/256` bytes each; a factored second moment a
        few kilobytes per matrix."""
        return state_bytes(self.spec, self.trainable_tensors(), self.c)

    def optimizer_temporaries(self) -> float:
        """The step's temporaries (`memory_optim.temporary_bytes`): torch's foreach AdamW one trainable-sized
        temporary (`sqrt(v)`), `trainable * c`; fused kernels none; `CoFiTuneAdamW` a few per chunk."""
        return optimizer_temporary_bytes(self.spec, self.trainable_tensors(), self.c, self.device)

    def buffers(self) -> float:
        """CoFiTune's soft-mask scales and row selections: two fp32 values per row of each wrapped module (per row of
        each expert for fused expert weights), and in `update`/`gradient` mode a third (the broadcast factor); 0 for
        the other methods."""
        if self.method != "cofitune":
            return 0
        return self.plan[3] * 4 * (2 if self.mask_mode == "none" else 3)

    # ---- activations -------------------------------------------------------------------------------------------
    def layers_in_backward(self) -> int:
        """Full fine-tuning, LoRA, QLoRA: all N layers; CoFiTune: the window's first layer and every layer above it
        (autograd records nothing below the lowest trained module); freeze tuning the same, unless the embeddings'
        output requires grad (`input_require_grads`: what transformers' checkpointing sets up, and CoFiTune undoes):
        then all N."""
        if self.method not in WINDOW_METHODS or (self.method == "freeze" and self.input_require_grads):
            return self.s.num_layers
        return self.s.num_layers - min(self.plan[2])

    def _frozen_layer(self) -> float:
        """A frozen decoder layer whose input needs a gradient, per token: `a * (3i + 2q + 2kv) + 8h + 4nh`: gate and
        up outputs and act(gate) for the SwiGLU product, q and the attention output plus k and v for SDPA's backward,
        the fp32 inputs of the two RMSNorms (4 bytes each) and the attention's fp32 log-sum-exp per head."""
        s = self.s
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        return self.a * (3 * s.intermediate + 2 * q + 2 * kv) + 8 * s.hidden + 4 * s.num_heads

    def _full_layer(self) -> float:
        """A fully trained layer, per token: `a * (4i + 2q + 2kv + h) + 16h + 4nh`: the frozen layer's tensors plus
        the inputs of every linear (for the weight gradients) and the fp32 normalised inputs of the two RMSNorms (for
        their weights' gradients)."""
        s = self.s
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        return self.a * (4 * s.intermediate + 2 * q + 2 * kv + s.hidden) + 16 * s.hidden + 4 * s.num_heads

    def _lora_layer(self, linears) -> float:
        """A LoRA layer, per token: the frozen layer plus each adapted linear's input for `lora_A`'s gradient and
        the `r`-wide `lora_A` outputs: `frozen + a * (2h + i) + 7 * c * r` when `a == c` (q/k/v and gate/up share an
        input), `frozen + c * sum(in_features) + n * c * r` when adapters are fp32 over a bf16/fp16 base (PEFT casts
        the input to the adapter dtype once per module)."""
        s, extra = self.s, len(linears) * self.c * self.rank
        if self.a == self.c and self.base_quant == "none":
            return self._frozen_layer() + self.a * (2 * s.hidden + s.intermediate) + extra
        return self._frozen_layer() + self.c * sum(i for _, i, _ in linears) + extra

    def _cofitune_layer(self, layer: int) -> float:
        """A CoFiTune layer, per token. The lean masked linear saves only its input `x` (in the compute dtype: `a`,
        or `c` over a quantised base where the delta runs apart) once per distinct input; W0 and the delta are
        saved by reference. Window layers above the first: `frozen + b * (inputs)`; the window's first layer (its
        input needs no gradient): `b * (inputs) + a * i` (act(gate), for the up projection's gradient) when only the
        FFN trains; frozen layers above the window: `frozen`. The mask modes differ only in per-row buffers. Freeze
        tuning's `nn.Linear` with a trained weight saves the same input for its weight gradient."""
        names = self.plan[2].get(layer)
        if not names:
            return self._frozen_layer()
        b = self.a if self.base_quant == "none" else self.c
        groups = {}
        for n, i, _ in self.s.linears[layer]:
            if n in names:
                short = n.rsplit(".", 1)[-1]
                key = "attn" if short in _ATTN_IN else "mlp" if short in _MLP_IN else n
                groups[key] = i
        inputs = b * sum(groups.values())
        attention_trained = any(n.rsplit(".", 1)[-1] in (*_ATTN_IN, "o_proj", "dense", "c_proj") for n in names)
        if layer == min(self.plan[2]) and not attention_trained:
            return inputs + self.a * self.s.intermediate
        return self._frozen_layer() + inputs

    def per_layer_activations(self) -> list[float]:
        """Bytes saved for backward by each decoder layer without checkpointing (0 for layers below CoFiTune's
        window): the per-token figure of its kind times `N`."""
        n, out = self.s.num_layers, []
        for layer in range(n):
            if layer < n - self.layers_in_backward():
                out.append(0.0)
            elif self.method == "full":
                out.append(self._full_layer() * self.tokens)
            elif self.method in ("lora", "qlora"):
                out.append(self._lora_layer(self.s.linears[layer]) * self.tokens)
            else:
                out.append(self._cofitune_layer(layer) * self.tokens)
        return out

    def activations(self) -> float:
        """Without checkpointing: the sum of `per_layer_activations`. With it: each backward-pass layer keeps only
        its input, `a * h * N` per layer, plus one layer's full activations while it is recomputed (the largest).
        Plus the final norm and lm_head input, `(a + 4) * h * N`."""
        per_layer = self.per_layer_activations()
        head = (self.a + 4) * self.s.hidden * self.tokens
        if not self.checkpointing:
            return sum(per_layer) + head
        return self.layers_in_backward() * self.a * self.s.hidden * self.tokens + max(per_layer) + head

    def logits(self) -> float:
        """The loss's peak (`memory_optim.loss_bytes`). The model's own loss, `12 * N * V`: transformers upcasts logits
        to fp32 and its cross-entropy saves the fp32 log-probabilities (4 B); in backward their gradient (4 B) and the
        logits' gradient (4 B) coexist with them (the forward's `a * N * V` logits plus the fp32 copy are freed by
        then, and are smaller). TRL's `SFTTrainer` (`loss="trl"`): its chunked kernel's tiles."""
        return loss_bytes(
            self.loss, self.device, tokens=self.tokens, vocab=self.s.vocab, hidden=self.s.hidden, a=self.a,
            lm_head_trains=self.method == "full",
        )  # fmt: skip

    def transient(self) -> float:
        """A quantised base dequantises one weight at a time for its matmul: the largest decoder linear at `a`."""
        if self.base_quant == "none":
            return 0
        return max(i * o for lin in self.s.linears for _, i, o in lin) * self.a

    def components(self) -> dict[str, float]:
        return {
            "base_weights": self.base_weights(),
            "trainable_weights": self.trainable_weights(),
            "gradients": self.gradients(),
            "optimizer_states": self.optimizer_states(),
            "optimizer_temporaries": self.optimizer_temporaries(),
            "buffers": self.buffers(),
            "activations": self.activations(),
            "logits": self.logits(),
            "transient": self.transient(),
        }


def estimate_training_memory(
    config_or_model,
    method: str = "cofitune",
    *,
    batch: int = 1,
    seq_len: int = 2048,
    dtype="bfloat16",
    optimizer: str = "adamw",
    base_quant: str | None = None,
    checkpointing: bool = True,
    mask_mode: str = "update",
    layers: tuple[int, int] | None = None,
    target_modules="ffn",
    lora_rank: int = 16,
    trainable_dtype: str = "float32",
    overhead_bytes: float = CUDA_OVERHEAD_BYTES,
    shapes: Shapes | None = None,
    unit_map: dict | None = None,
    layers_pattern: str | None = None,
    state_dtype: str | None = None,
    second_moment: str = "full",
    momentum: bool = True,
    fused_step: bool = False,
    device: str = "cuda",
    loss: str = "transformers",
    input_require_grads: bool | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of one training step on one GPU (no sharding), from the model's shapes.

    Args:
        config_or_model: a transformers config, a config dict, a `KNOWN_SHAPES` name, a local config path/folder, a
            Hub id (only its config.json is read), or a model (its config is used; the model is not touched).
        method (`str`): `"cofitune"` (default window and FFN unless `layers`/`target_modules`), `"lora"` (r=`lora_rank`,
            all-linear), `"qlora"` (LoRA over a 4-bit nf4 base), `"full"` (every parameter, trained in `dtype`),
            `"freeze"` (CoFiTune's window modules trained in place in `dtype`: the freeze-tuning peer).
        batch, seq_len (`int`): tokens per step are `batch * seq_len` (no packing or padding modelled).
        dtype (`str`): the base model's and the activations' dtype: bfloat16/float16/float32 (or bf16/fp16/fp32).
        optimizer (`str`): `"adamw"` (torch's; states in the parameter dtype), `"adamw_fused"` (torch's `fused=True`,
            the Trainer's default), `"adamw8bit"` (bitsandbytes) or `"cofitune_adamw"` (`CoFiTuneAdamW`).
        base_quant (`str`, *optional*): `None`/`"none"`, `"4bit"` (nf4, double quant) or `"8bit"`; not for `full`.
        checkpointing (`bool`): gradient checkpointing of every decoder layer (non-reentrant).
        mask_mode (`str`): CoFiTune's `softmask_mode`; the modes differ only in small per-row buffers.
        trainable_dtype (`str`): the adapters' dtype (PEFT keeps them in float32 by default; CoFiTune's deltas follow
            `CoFiTuneConfig.delta_dtype`); full and freeze tuning train in `dtype`.
        overhead_bytes (`float`): CUDA context and allocator slack added to the peak; 0 for CPU.
        unit_map, layers_pattern: the layout, as `CoFiTuneConfig` takes them (for models CoFiTune cannot read alone).
        state_dtype (`str`, *optional*): the optimizer moments' storage (`"float32"`, `"bfloat16"`, `"int8"`); `None`
            is the optimizer's own.
        second_moment (`str`): `"full"` or `"factored"` (`cofitune_adamw`).
        momentum (`bool`): `False`: no first moment (`cofitune_adamw` with `betas[0] == 0`).
        fused_step (`bool`): the step fused into the backward pass (`cofitune_adamw`): no step phase with every
            gradient alive.
        device (`str`): `"cuda"` or `"cpu"` (optimizer kernels and TRL's loss differ).
        loss (`str`): `"transformers"` (the model's own loss over full logits, a plain loop) or `"trl"` (TRL's
            `SFTTrainer` and its chunked kernel).
        input_require_grads (`bool`, *optional*): freeze tuning: whether the embeddings' output requires grad, which
            puts every layer in the backward pass. `None`: as transformers sets it up, on with `checkpointing`
            (`activation_checkpointing_enable` calls `enable_input_require_grads`; LLaMA-Factory's freeze tuning does
            the same), off without. CoFiTune removes it (`fix_input_grads`), so it does not apply there.
    """
    method = method.lower()
    dtype, trainable_dtype = _dtype_name(dtype), _dtype_name(trainable_dtype)
    base_quant = "none" if base_quant in (None, "none") else base_quant
    if method == "qlora":
        base_quant = "4bit" if base_quant == "none" else base_quant
    problems = []
    if method not in METHODS:
        problems.append(f"`method` must be one of {METHODS}, got {method!r}")
    spec = OptimizerSpec(optimizer, state_dtype, second_moment, momentum, fused_step)
    problems += spec.problems()
    if device not in DEVICES:
        problems.append(f"`device` must be one of {DEVICES}, got {device!r}")
    if loss not in LOSSES:
        problems.append(f"`loss` must be one of {LOSSES}, got {loss!r}")
    if base_quant not in BASE_QUANTS:
        problems.append(f"`base_quant` must be one of {BASE_QUANTS}, got {base_quant!r}")
    if mask_mode not in MASK_MODES:
        problems.append(f"`mask_mode` must be one of {MASK_MODES}, got {mask_mode!r}")
    if method in ("full", "freeze") and base_quant != "none":
        problems.append(
            f"{method} tuning trains base weights in place and cannot train a quantised base; use `base_quant=None`"
        )
    if batch < 1 or seq_len < 1:
        problems.append(f"`batch` and `seq_len` must be >= 1, got {batch} and {seq_len}")
    if problems:
        raise CoFiTuneError("; ".join(problems) + ".")
    config = config_or_model.config if isinstance(config_or_model, nn.Module) else load_config(config_or_model)
    if shapes is None:
        shapes = Shapes.from_model(meta_model(config), unit_map, layers_pattern)
    plan = None
    if method in WINDOW_METHODS:
        key = (tuple(layers) if layers else None, str(target_modules), repr(unit_map), layers_pattern)
        if key not in shapes.cofitune:
            shapes.cofitune[key] = cofitune_plan(config, layers, target_modules, unit_map, layers_pattern)
        plan = shapes.cofitune[key]
    model = MemoryModel(
        shapes, method, batch=batch, seq_len=seq_len, dtype=dtype, optimizer=spec, base_quant=base_quant,
        checkpointing=checkpointing, mask_mode=mask_mode, lora_rank=lora_rank, trainable_dtype=trainable_dtype,
        plan=plan, device=device, loss=loss,
        input_require_grads=checkpointing if input_require_grads is None else bool(input_require_grads),
    )  # fmt: skip
    comp = model.components()
    static = comp["base_weights"] + comp["trainable_weights"] + comp["optimizer_states"] + comp["buffers"]
    phases = {
        "backward_start": static + comp["activations"] + comp["logits"] + comp["transient"],
        "optimizer_step": static + comp["gradients"] + comp["optimizer_temporaries"],
    }
    allocated = max(phases.values())
    settings = {
        "batch": batch, "seq_len": seq_len, "dtype": dtype, "optimizer": optimizer, "base_quant": base_quant,
        "checkpointing": checkpointing, "mask_mode": mask_mode if method == "cofitune" else None,
        "window": plan[1] if plan else None, "lora_rank": lora_rank if method in ("lora", "qlora") else None,
        "trainable_dtype": trainable_dtype if method not in ("full", "freeze") else dtype,
        "overhead_bytes": overhead_bytes, "optimizer_detail": spec.describe(model.c), "device": device, "loss": loss,
    }  # fmt: skip
    return MemoryEstimate(
        method=method,
        settings=settings,
        components=comp,
        phases=phases,
        peak_bytes=allocated + overhead_bytes,
        peak_allocated_bytes=allocated,
        trainable_params=model.trainable_params(),
        total_params=shapes.total_params,
        layers_in_backward=model.layers_in_backward(),
        num_layers=shapes.num_layers,
    )


def compare_methods(config_or_model, methods=("cofitune", "lora", "qlora", "full"), **kwargs) -> list[MemoryEstimate]:
    """`estimate_training_memory` for several methods, building the meta model once."""
    config = config_or_model.config if isinstance(config_or_model, nn.Module) else load_config(config_or_model)
    shapes = Shapes.from_model(meta_model(config))
    return [estimate_training_memory(config, m, shapes=shapes, **kwargs) for m in methods]


def gib(value: float) -> float:
    return math.floor(value / GIB * 100 + 0.5) / 100
