"""The optimizer's and the loss's share of a training step's peak memory, for `cofitune_peft.kit.memory`.

Optimizers (`OPTIMIZERS`): `adamw` (`torch.optim.AdamW`'s default: foreach on CUDA, one tensor at a time on CPU),
`adamw_fused` (`fused=True`, the Trainer's default `adamw_torch_fused`), `adamw8bit` (bitsandbytes) and
`cofitune_adamw` (`cofitune_peft.CoFiTuneAdamW`: a state dtype, a factored second moment, the step fused into the
backward pass). Losses (`LOSSES`): `transformers` (the model's own cross-entropy over the full logits, what a plain
loop gets) and `trl` (TRL >= 1.16's `SFTTrainer`, whose chunked log-probability kernel never builds the `[N, V]`
logits). Sizes in bytes; `c` is the trainable parameters' dtype size.
"""

from __future__ import annotations

from dataclasses import dataclass

OPTIMIZERS = ("adamw", "adamw_fused", "adamw8bit", "cofitune_adamw")
STATE_DTYPES = ("float32", "bfloat16", "int8")
SECOND_MOMENTS = ("full", "factored")
LOSSES = ("transformers", "trl")
DEVICES = ("cuda", "cpu")
# bitsandbytes' 8-bit state: one byte a value plus one float32 absmax per 256-value block.
INT8_STATE_BYTES = 1 + 4 / 256
_STATE_BYTES = {"float32": 4, "bfloat16": 2, "int8": INT8_STATE_BYTES}
# TRL's chunked log-probability kernel works on tiles of at most 4096 tokens x 32768 vocabulary entries
# (`trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE` and `_CHUNKED_LOGPROB_CHUNK_SIZE`, TRL 1.16).
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768
# Its backward's live temporaries on CPU (torch ops instead of Triton), measured with a live-tensor probe (a
# TorchDispatchMode counting the storages each op creates until they are freed; torch 2.13, TRL 1.16, SmolLM2's
# 576 x 49152 head, 256 and 1024 tokens, a straight line through the two): bytes per token and vocabulary entry of a
# tile, and bytes per vocabulary entry and hidden unit of a tile (the weight chunk cast to float32), by activation size.
TRL_CPU_PER_TOKEN = {4: 33.1, 2: 31.1}
TRL_CPU_PER_WEIGHT = {4: 6.0, 2: 3.0}


@dataclass(frozen=True)
class OptimizerSpec:
    """What of the optimizer the memory model needs.

    Args:
        name (`str`): one of `OPTIMIZERS`.
        state_dtype (`str`, *optional*): the moments' storage; `None` is the optimizer's own: the parameter's dtype
            for torch's AdamW, `"int8"` for bitsandbytes, `"float32"` for `CoFiTuneAdamW`.
        second_moment (`str`, *optional*, defaults to `"full"`): `"factored"`: Adafactor's row and column averages
            (`cofitune_adamw` only).
        momentum (`bool`, *optional*, defaults to `True`): `False` keeps no first moment (`betas[0] == 0`).
        fused_step (`bool`, *optional*, defaults to `False`): the step fused into the backward pass (`cofitune_adamw`):
            one gradient at a time.
        chunk_size (`int`, *optional*, defaults to 2**22): `CoFiTuneAdamW`'s values per chunk.
    """

    name: str = "adamw"
    state_dtype: str | None = None
    second_moment: str = "full"
    momentum: bool = True
    fused_step: bool = False
    chunk_size: int = 1 << 22

    def problems(self) -> list[str]:
        out = []
        if self.name not in OPTIMIZERS:
            out.append(f"`optimizer` must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.state_dtype is not None and self.state_dtype not in STATE_DTYPES:
            out.append(f"`state_dtype` must be None or one of {STATE_DTYPES}, got {self.state_dtype!r}")
        if self.second_moment not in SECOND_MOMENTS:
            out.append(f"`second_moment` must be one of {SECOND_MOMENTS}, got {self.second_moment!r}")
        if self.name != "cofitune_adamw" and (self.second_moment != "full" or self.fused_step or not self.momentum):
            out.append("`second_moment`, `fused_step` and `momentum=False` need `optimizer='cofitune_adamw'`")
        if self.name == "adamw8bit" and self.state_dtype not in (None, "int8"):
            out.append(f"`optimizer='adamw8bit'` keeps int8 states, got `state_dtype={self.state_dtype!r}`")
        return out

    def resolved_state(self, param_bytes: int) -> str:
        if self.state_dtype is not None:
            return self.state_dtype
        if self.name == "adamw8bit":
            return "int8"
        if self.name == "cofitune_adamw":
            return "float32"
        return {4: "float32", 2: "bfloat16"}[param_bytes]

    def describe(self, param_bytes: int) -> str:
        bits = [self.name, f"{self.resolved_state(param_bytes)} states"]
        if self.second_moment == "factored":
            bits.append("factored second moment")
        if not self.momentum:
            bits.append("no momentum")
        if self.fused_step:
            bits.append("fused step")
        return ", ".join(bits)


def state_bytes(spec: OptimizerSpec, tensors: list[tuple[int, int]], param_bytes: int) -> float:
    """The moments: `per * numel` for each of the first (if `momentum`) and second moment, `per` = 4 (float32), 2
    (bfloat16) or `INT8_STATE_BYTES`; a factored second moment is `4 * (rows + cols)` per matrix."""
    per = _STATE_BYTES[spec.resolved_state(param_bytes)]
    numel = sum(r * c for r, c in tensors)
    first = per * numel if spec.momentum else 0.0
    if spec.second_moment == "factored":
        second = sum(4 * (r + c) if r > 1 and c > 1 else per * r * c for r, c in tensors)
    else:
        second = per * numel
    return first + second


def gradient_bytes(spec: OptimizerSpec, tensors: list[tuple[int, int]], param_bytes: int) -> float:
    """Every gradient at once (`c * numel`), or with the fused step only the largest tensor's, the one alive while its
    hook steps it."""
    if spec.fused_step:
        return param_bytes * max(r * c for r, c in tensors)
    return param_bytes * sum(r * c for r, c in tensors)


def temporary_bytes(spec: OptimizerSpec, tensors: list[tuple[int, int]], param_bytes: int, device: str) -> float:
    """The step's own temporaries.

    `adamw`: foreach (CUDA) holds `sqrt(v)` for every tensor at once, `c * numel`; one tensor at a time (CPU) holds
    `sqrt(v)` and `sqrt(v) / bias` of the largest, `2 c * largest`. `adamw_fused`: none. `adamw8bit`: none on CUDA
    (one kernel); on CPU bitsandbytes dequantizes both states and copies the gradient and parameter to float32, plus
    the denominator's two temporaries: `24 * largest`. `cofitune_adamw`: per chunk of `n = min(chunk_size, largest)`
    values, `8 n` (square root and denominator) plus `4 n` for each float32 copy (a low-precision gradient and
    parameter, each state not stored in float32, the factored `r c / mean(r)`) and `9 n` for stochastic rounding (an
    int32 draw, a mask and the result).
    """
    numel = sum(r * c for r, c in tensors)
    largest = max(r * c for r, c in tensors)
    if spec.name == "adamw":
        return param_bytes * numel if device == "cuda" else 2 * param_bytes * largest
    if spec.name == "adamw_fused":
        return 0.0
    if spec.name == "adamw8bit":
        return 0.0 if device == "cuda" else 24.0 * largest
    n = min(spec.chunk_size, largest)
    low = param_bytes < 4
    state = spec.resolved_state(param_bytes)
    copies = (2 if low else 0) + (0 if state == "float32" else (2 if spec.momentum else 1))
    copies += 1 if spec.second_moment == "factored" else 0
    return n * (8 + 4 * copies + (9 if low else 0))


def loss_bytes(loss: str, device: str, *, tokens: int, vocab: int, hidden: int, a: int, lm_head_trains: bool) -> float:
    """The loss's peak at the start of the backward pass.

    `transformers`: `12 N V`: the float32 log-probabilities the cross-entropy saves, their gradient and the logits'
    gradient. `trl` on CPU: TRL's chunked kernel in torch ops, `TRL_CPU_PER_TOKEN[a] * n * v +
    TRL_CPU_PER_WEIGHT[a] * v * h` with `n = min(N, 4096)` tokens and `v = min(V, 32768)` vocabulary entries a tile
    (measured); on CUDA (Triton, not measured): one tile in the activation dtype and the float32 gradient of the hidden
    states, `a n v + 4 N h`. Both add the float32 accumulator of the LM head's gradient, `4 V h`, when it trains.
    """
    if loss == "transformers":
        return 12.0 * tokens * vocab
    n, v = min(tokens, TRL_TOKEN_CHUNK), min(vocab, TRL_VOCAB_CHUNK)
    head = 4.0 * vocab * hidden if lm_head_trains else 0.0
    if device == "cpu":
        return TRL_CPU_PER_TOKEN[a] * n * v + TRL_CPU_PER_WEIGHT[a] * v * hidden + head
    return a * n * v + 4.0 * tokens * hidden + head
