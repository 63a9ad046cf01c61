"""`CoFiTuneAdamW`: AdamW for CoFiTune's deltas (arXiv 2404.10306) in low precision, with a small optimizer state and,
on request, the step fused into the backward pass.

Three memory levers, each optional, all in one per-tensor step (`_step_tensor`) that the plain `step()` and the fused
hook share, so that a fused run takes the very same steps as an unfused one:

- **Stochastic rounding** (`rounding="stochastic"`, the default): a bf16/fp16 parameter is updated in float32, chunk
  by chunk, and rounded to its dtype up or down at random, with the probability that makes the rounding unbiased
  (`E[round(x)] = x`). A step smaller than half the parameter's spacing then moves it in expectation instead of being
  dropped, at no memory cost (Kahan summation would keep the lost bits exactly, but in a second low-precision buffer
  as large as the delta: the memory of float32 deltas). Float32 parameters are updated in place, as `torch.optim.AdamW`.
- **The optimizer state** (`state_dtype`): `"float32"`, `"bfloat16"` (rounded to nearest, as torch's AdamW) or `"int8"`:
  bitsandbytes' blockwise dynamic 8-bit format (256-value blocks, one float32 absmax each; tensors under 4096 values
  keep float32 states), the format of `bitsandbytes.optim.AdamW8bit`; `second_moment="factored"` keeps Adafactor's row
  and column averages of the squared gradient instead of a full second moment, with Adafactor's update clipping
  (Shazeer & Stern 2018: the normalised gradient's RMS is capped at 1, and the first moment averages it), and
  `betas[0] == 0` keeps no first moment.
- **The fused step** (`fused_backward=True`): each parameter steps from a `register_post_accumulate_grad_hook` as soon
  as its gradient is complete, and the gradient is freed there, so no delta's gradient outlives its layer's backward.
  What needs every gradient at once is refused by name (`CoFiTuneError`): gradient accumulation, global gradient
  clipping, gradient scaling (fp16 AMP), and data-parallel or sharded training (DDP reduces gradients after the hook
  fires; FSDP's hooks never fire, docs/scaling-out.md).

With `rounding="nearest"`, float32 parameters and float32 states the step is `torch.optim.AdamW(foreach=False)`'s bit
for bit; with `state_dtype="int8"` it is bitsandbytes' 8-bit Adam update (its CPU implementation bit for bit).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch

from .errors import CoFiTuneError

logger = logging.getLogger(__name__)

ROUNDINGS = ("stochastic", "nearest")
STATE_DTYPES = ("float32", "bfloat16", "int8")
SECOND_MOMENTS = ("full", "factored")
_LOW = (torch.bfloat16, torch.float16)
_BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer states
_MIN_8BIT = 4096  # bitsandbytes' `min_8bit_size`: smaller tensors keep float32 states
_FACTORED_EPS = 1e-30  # Adafactor's eps1, added to the squared gradient before averaging


# ---------------------------------------------------------------------------------------------- stochastic rounding


def stochastic_round_(out: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Write `value` (float32) into `out` (bfloat16 or float16), rounded up or down at random so that the expected
    result is `value`: the nearer representable neighbour is taken with probability 1 - distance / spacing.

    bfloat16 keeps the top 16 bits of a float32, so adding a uniform random 16-bit integer to the bits and truncating
    rounds up with exactly that probability (infinities stay infinite; the largest finite values may round to
    infinity, as they would by a hair more). float16 goes through `torch.nextafter`.
    """
    if out.dtype == torch.bfloat16:
        bits = value.contiguous().view(torch.int32)
        noise = _random_16bit(bits.numel(), value.device, generator).view(bits.shape)
        noise.add_(bits).bitwise_and_(-65536)  # the random carry into bit 16, low bits cleared
        out.copy_(noise.view(torch.float32))
        return
    if out.dtype != torch.float16:
        out.copy_(value)
        return
    near = value.to(torch.float16)
    residual = value - near.float()  # [n], exact: |residual| <= half a spacing
    towards = torch.where(residual > 0, torch.inf, -torch.inf).to(torch.float16)
    other = torch.nextafter(near, towards)
    spacing = (other.float() - near.float()).abs_()
    chance = torch.where(spacing > 0, residual.abs() / spacing, torch.zeros_like(spacing))
    draw = torch.rand(value.shape, device=value.device, generator=generator)
    out.copy_(torch.where((draw < chance) & torch.isfinite(value), other, near))


def _random_16bit(n: int, device, generator: torch.Generator | None) -> torch.Tensor:
    """`n` uniform random integers in [0, 2**16) as int32: three 16-bit slices of each random 64-bit draw (the top
    slice is left out: it has a sign bit that is always 0), a third of the generator calls of one draw per value."""
    draws = torch.empty((n + 2) // 3, dtype=torch.int64, device=device).random_(generator=generator)
    slices = draws.view(torch.int16).view(-1, 4)[:, :3]  # little-endian: the low 48 bits
    return slices.reshape(-1)[:n].to(torch.int32).bitwise_and_(0xFFFF)


# ---------------------------------------------------------------------------------------------- 8-bit states


def _bnb_functional():
    try:
        import bitsandbytes.functional as bnbf
    except Exception as err:  # ImportError, or a broken native library
        raise CoFiTuneError(
            f"`state_dtype='int8'` stores the optimizer state in bitsandbytes' 8-bit format, but bitsandbytes does "
            f"not import ({type(err).__name__}: {err}); `pip install 'cofitune-peft[quantized]'` "
            "(bitsandbytes>=0.50), or use `state_dtype='bfloat16'`."
        ) from err
    return bnbf


class _Int8State:
    """A tensor's optimizer state in bitsandbytes' blockwise dynamic 8-bit format: `codes` (uint8, one per value) and
    `absmax` (float32, one per 256 values), read and written chunk by chunk (chunks start on a block boundary)."""

    @staticmethod
    def new(numel: int, device) -> dict[str, torch.Tensor]:
        blocks = -(-numel // _BLOCK)
        return {
            "codes": torch.zeros(numel, dtype=torch.uint8, device=device),
            "absmax": torch.zeros(blocks, dtype=torch.float32, device=device),
        }

    @staticmethod
    def read(state: dict, start: int, end: int, code: torch.Tensor) -> torch.Tensor:
        bnbf = _bnb_functional()
        blocks = slice(start // _BLOCK, -(-end // _BLOCK))
        return bnbf.dequantize_blockwise(
            state["codes"][start:end], absmax=state["absmax"][blocks], code=code, blocksize=_BLOCK
        )

    @staticmethod
    def write(state: dict, start: int, end: int, value: torch.Tensor, code: torch.Tensor) -> None:
        bnbf = _bnb_functional()
        codes, quant = bnbf.quantize_blockwise(value, code=code, blocksize=_BLOCK)
        state["codes"][start:end].copy_(codes)
        state["absmax"][start // _BLOCK : -(-end // _BLOCK)].copy_(quant.absmax)


# ---------------------------------------------------------------------------------------------- the optimizer


class CoFiTuneAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) for CoFiTune deltas in low precision: stochastic rounding, small optimizer states,
    and an optional step fused into the backward pass.

    Works on any parameters (CoFiTune deltas, a LoRA, the weights of a freeze-tuning baseline), with Trainer/TRL
    (`optimizer_cls_and_kwargs=(CoFiTuneAdamW, {...})` or `optimizers=(CoFiTuneAdamW(...), None)`) and with the kit's
    `train_sft(optimizer=functools.partial(CoFiTuneAdamW, ...))`. Build it after `get_peft_model` (PEFT replaces the
    adapter parameters when it casts them).

    Args:
        params: parameters or parameter groups, as for `torch.optim.AdamW`.
        lr (`float`, *optional*, defaults to 1e-3): learning rate.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`): Adam's betas; `betas[0] == 0` keeps no
            first moment (no momentum, no memory for it).
        eps (`float`, *optional*, defaults to 1e-8): added to the square root of the second moment.
        weight_decay (`float`, *optional*, defaults to 0.01): decoupled weight decay (on a CoFiTune delta it pulls the
            weight back toward the base weight).
        rounding (`str`, *optional*, defaults to `"stochastic"`): how a bf16/fp16 parameter takes its float32 update: `"stochastic"` (unbiased, keeps small steps in expectation) or `"nearest"`
            (what `torch.optim.AdamW` does to a bf16 parameter: a step below half the spacing is lost).
        state_dtype (`str`, *optional*, defaults to `"float32"`): `"float32"`, `"bfloat16"` (rounded to nearest; with
            `betas[1]` close to 1 a bf16 second moment can stall, as with torch's AdamW on bf16 parameters) or
            `"int8"` (bitsandbytes' 8-bit blockwise format; needs `bitsandbytes`).
        second_moment (`str`, *optional*, defaults to `"full"`): `"full"` (Adam) or `"factored"`: Adafactor for 2-D
            tensors (row and column averages of the squared gradient, a few kilobytes per matrix; the normalised
            gradient clipped to RMS 1, and the first moment, if any, averaging it); 1-D tensors keep Adam's.
        fused_backward (`bool`, *optional*, defaults to `False`): step each parameter inside the backward pass as soon
            as its gradient is complete, and free the gradient. `step()` then only checks that every gradient was
            consumed. Refused under data parallelism/sharding; gradient accumulation is detected and refused.
        training_args (`transformers.TrainingArguments`, *optional*): with `fused_backward`, checked up front:
            `gradient_accumulation_steps` must be 1, `max_grad_norm` 0 or None (global clipping needs every gradient at
            once), no `fp16` loss scaling, no DeepSpeed/FSDP. Pass it when a Trainer drives this optimizer: the
            Trainer clips (`max_grad_norm=1.0` by default) after the backward pass, when the gradients are gone.
        seed (`int`, *optional*, defaults to 0): the seed of the stochastic rounding; each tensor's draws depend on
            the seed, the tensor's position in the parameter list and the step, not on the order the tensors step in.
        chunk_size (`int`, *optional*, defaults to 2**22): values updated at a time (bounds the float32 temporaries).

    Example:

    ```python
    >>> import torch
    >>> from cofitune_peft import CoFiTuneAdamW
    >>> w = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    >>> opt = CoFiTuneAdamW([w], lr=1e-3, rounding="stochastic")
    >>> w.grad = torch.ones(4, dtype=torch.bfloat16)
    >>> opt.step()
    >>> bool((w < 0).all())
    True
    ```
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        rounding: str = "stochastic",
        state_dtype: str = "float32",
        second_moment: str = "full",
        fused_backward: bool = False,
        training_args: Any = None,
        seed: int = 0,
        chunk_size: int = 1 << 22,
    ):
        problems = []
        if not lr >= 0:
            problems.append(f"`lr` must be >= 0, got {lr!r}.")
        if not (len(betas) == 2 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            problems.append(f"`betas` must be two values in [0, 1), got {betas!r}.")
        if not eps >= 0:
            problems.append(f"`eps` must be >= 0, got {eps!r}.")
        if rounding not in ROUNDINGS:
            problems.append(f"`rounding` must be one of {ROUNDINGS}, got {rounding!r}.")
        if state_dtype not in STATE_DTYPES:
            problems.append(f"`state_dtype` must be one of {STATE_DTYPES}, got {state_dtype!r}.")
        if second_moment not in SECOND_MOMENTS:
            problems.append(f"`second_moment` must be one of {SECOND_MOMENTS}, got {second_moment!r}.")
        if not (isinstance(chunk_size, int) and chunk_size >= _BLOCK):
            problems.append(f"`chunk_size` must be an int >= {_BLOCK}, got {chunk_size!r}.")
        if problems:
            raise CoFiTuneError("Invalid CoFiTuneAdamW arguments:\n  - " + "\n  - ".join(problems))
        if state_dtype == "int8":
            _bnb_functional()
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.rounding, self.state_dtype, self.second_moment = rounding, state_dtype, second_moment
        self.seed, self.chunk_size = int(seed), chunk_size
        self.fused_backward = bool(fused_backward)
        self._index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._codes: dict[tuple, torch.Tensor] = {}
        self._hooks: list = []
        self._stepped: set[int] = set()
        if self.fused_backward:
            check_fused_backward(self.param_groups, training_args)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(group)))

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step of every parameter with a gradient (with `fused_backward`: only a check, the parameters
        stepped during the backward pass)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self.fused_backward:
                    raise CoFiTuneError(
                        "`fused_backward=True`, but a parameter still holds a gradient at `step()`: its backward hook "
                        "did not run. The hooks sit on the parameters the optimizer was built with; build it after "
                        "`get_peft_model` and after any cast of the model (PEFT's `cast_adapter_dtype` replaces "
                        "parameters), and do not wrap the model in DDP/FSDP."
                    )
                self._step_tensor(p, group)
        self._stepped.clear()
        return loss

    def _make_hook(self, group: dict):
        def hook(p: torch.Tensor) -> None:
            if id(p) in self._stepped:
                raise CoFiTuneError(
                    "`fused_backward=True` steps each parameter during the backward pass, but a second backward "
                    "reached a parameter before `optimizer.step()` was called: gradient accumulation (or a second "
                    "`backward` of the same step), which the fused step cannot honour. Set "
                    "`gradient_accumulation_steps=1`, or use `fused_backward=False`."
                )
            with torch.no_grad():
                self._step_tensor(p, group)
            p.grad = None
            self._stepped.add(id(p))

        return hook

    def load_state_dict(self, state_dict: dict) -> None:
        """As `torch.optim.Optimizer.load_state_dict`, but the state keeps its dtypes (torch would cast every
        floating-point state to the parameter's dtype: float32 moments and 8-bit absmax values of a bf16 delta)."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i in saved:
                self.state[p] = _to_device(saved[i], p.device)

    def remove_hooks(self) -> None:
        """Remove the fused step's backward hooks (the optimizer then steps nothing until rebuilt)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ the per-tensor step

    def _code(self, signed: bool, device) -> torch.Tensor:
        key = (signed, str(device))
        if key not in self._codes:
            self._codes[key] = _bnb_functional().create_dynamic_map(signed=signed).to(device)
        return self._codes[key]

    def _init_state(self, p: torch.Tensor, state: dict, beta1: float) -> None:
        state["step"] = 0
        n = p.numel()
        int8 = self.state_dtype == "int8" and n >= _MIN_8BIT
        dtype = torch.bfloat16 if self.state_dtype == "bfloat16" else torch.float32
        if beta1 > 0:
            if int8:
                state["exp_avg"] = _Int8State.new(n, p.device)
            else:
                state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        if self._factored(p):
            rows, cols = p.shape[0], n // p.shape[0]
            state["exp_avg_sq_row"] = torch.zeros(rows, dtype=torch.float32, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(cols, dtype=torch.float32, device=p.device)
        elif int8:
            state["exp_avg_sq"] = _Int8State.new(n, p.device)
        else:
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)

    def _factored(self, p: torch.Tensor) -> bool:
        return self.second_moment == "factored" and p.dim() >= 2

    def _generator(self, p: torch.Tensor, step: int) -> torch.Generator | None:
        if self.rounding != "stochastic":
            return None
        gen = torch.Generator(device=p.device)
        gen.manual_seed((self.seed * 1_000_003 + self._index.get(id(p), 0)) * 1_000_033 + step)
        return gen

    def _step_tensor(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise CoFiTuneError("CoFiTuneAdamW does not support sparse gradients.")
        state = self.state[p]
        beta1, beta2 = group["betas"]
        if not state:
            self._init_state(p, state, beta1)
        state["step"] += 1
        step = state["step"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        bias1 = 1 - beta1**step
        bias2_sqrt = math.sqrt(1 - beta2**step)
        generator = self._generator(p, step)
        data = p.data if p.is_contiguous() else p.data.contiguous()
        flat_p, flat_g = data.view(-1), grad.contiguous().view(-1)
        factored = self._factored(p)
        cols = p.numel() // p.shape[0] if factored else 1
        if factored:
            root_row, root_col, clip = self._update_factors(state, grad, beta2, bias2_sqrt)
        unit = math.lcm(cols, _BLOCK)
        size = max(unit, self.chunk_size // unit * unit)
        for start in range(0, flat_p.numel(), size):
            end = min(start + size, flat_p.numel())
            g = flat_g[start:end]
            g = g if g.dtype == torch.float32 else g.float()
            x = flat_p[start:end]
            x = x if x.dtype == torch.float32 else x.float()
            if decay != 0:
                x.mul_(1 - lr * decay)
            if factored:  # Adafactor: the normalised gradient, clipped, then (optionally) averaged
                v = None
                rows = slice(start // cols, end // cols)
                u = g / torch.outer(root_row[rows], root_col).view(-1).add_(eps)
                if clip != 1.0:
                    u.mul_(clip)
                m = self._first_moment(state, start, end, u, beta1, p.device)
                x.add_(u if m is None else m, alpha=-lr / bias1)
            else:  # Adam
                m = self._first_moment(state, start, end, g, beta1, p.device)
                v = self._second_moment(state, start, end, g, beta2, p.device)
                denom = (v.sqrt() / bias2_sqrt).add_(eps)
                if m is None:
                    x.addcdiv_(g, denom, value=-lr)
                else:
                    x.addcdiv_(m, denom, value=-lr / bias1)
            self._write(flat_p[start:end], x, generator)
            self._store_moments(state, start, end, m, v, p.device)
        if data is not p.data:
            p.data.copy_(data)

    def _update_factors(self, state: dict, grad: torch.Tensor, beta2: float, bias2_sqrt: float):
        """Adafactor's second moment of a matrix `[R, C]` (Shazeer & Stern 2018): `r`, `c` = exponential averages of
        the row and column means of `grad**2 + eps1`, `v = r c / mean(r)` (bias-corrected like Adam's). Returns
        `(sqrt of the row factor / sqrt(mean(r)) / bias, sqrt of the column factor, clip)`, where `clip` scales the
        normalised gradient `u = grad / sqrt(v)` so that its RMS is at most 1 (Adafactor's update clipping, d = 1): the
        factored estimate can be far below a few entries' own square, and their steps would be many times Adam's."""
        rows = grad.shape[0]
        g2 = grad.reshape(rows, -1)
        row = torch.empty(rows, dtype=torch.float32, device=grad.device)
        col = torch.zeros(g2.shape[1], dtype=torch.float32, device=grad.device)
        step = max(1, self.chunk_size // max(1, g2.shape[1]))
        for a in range(0, rows, step):
            sq = g2[a : a + step].float().square()  # never in place: it may be the gradient itself
            row[a : a + step] = sq.mean(dim=1)
            col.add_(sq.sum(dim=0))
        row.add_(_FACTORED_EPS)  # mean(g**2 + eps1) = mean(g**2) + eps1
        col.div_(rows).add_(_FACTORED_EPS)
        state["exp_avg_sq_row"].lerp_(row, 1 - beta2)
        state["exp_avg_sq_col"].lerp_(col, 1 - beta2)
        root_row = state["exp_avg_sq_row"].sqrt().div_(float(state["exp_avg_sq_row"].mean().sqrt()) * bias2_sqrt)
        root_col = state["exp_avg_sq_col"].sqrt()
        # mean(u**2) = mean_i (1 / root_row_i**2) * mean_j (g_ij**2 / root_col_j**2): one more pass over g**2
        inv_col = root_col.square().reciprocal_()
        total = 0.0
        for a in range(0, rows, step):
            sq = g2[a : a + step].float().square()
            total += float((sq @ inv_col).div_(root_row[a : a + step].square()).sum())
        rms = math.sqrt(total / g2.numel())
        return root_row, root_col, 1.0 / max(1.0, rms)

    def _first_moment(self, state, start, end, g, beta1, device) -> torch.Tensor | None:
        if "exp_avg" not in state:
            return None
        stored = state["exp_avg"]
        if isinstance(stored, dict):  # int8, bitsandbytes' update order
            m = _Int8State.read(stored, start, end, self._code(True, device))
            return m.mul_(beta1).add_(g, alpha=1 - beta1)
        m = stored.view(-1)[start:end]
        m = m if m.dtype == torch.float32 else m.float()
        return m.lerp_(g, 1 - beta1)  # torch.optim.AdamW's update order

    def _second_moment(self, state, start, end, g, beta2, device) -> torch.Tensor:
        stored = state["exp_avg_sq"]
        if isinstance(stored, dict):
            v = _Int8State.read(stored, start, end, self._code(False, device))
        else:
            v = stored.view(-1)[start:end]
            v = v if v.dtype == torch.float32 else v.float()
        return v.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    def _store_moments(self, state, start, end, m, v, device) -> None:
        for key, value, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
            if value is None or key not in state:
                continue
            stored = state[key]
            if isinstance(stored, dict):
                _Int8State.write(stored, start, end, value, self._code(signed, device))
            elif stored.dtype != torch.float32:
                stored.view(-1)[start:end].copy_(value)  # bf16 states round to nearest, as torch's AdamW
            # float32 states were updated in place

    def _write(self, target: torch.Tensor, value: torch.Tensor, generator) -> None:
        if value.data_ptr() == target.data_ptr():
            return  # updated in place (float32)
        if target.dtype in _LOW and self.rounding == "stochastic":
            stochastic_round_(target, value, generator)
        else:
            target.copy_(value)


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device, copy=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def check_fused_backward(param_groups, training_args=None) -> None:
    """Refuse, by name, what a step fused into the backward pass cannot honour (raises `CoFiTuneError`)."""
    problems = []
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        problems.append(
            f"data-parallel or sharded training ({torch.distributed.get_world_size()} processes): DDP reduces the "
            "gradients after the per-parameter hook has fired (each rank would step on its own gradient), and "
            "FSDP's hooks never fire"
        )
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if any(isinstance(p, DTensor) for g in param_groups for p in g["params"]):
        problems.append("sharded (DTensor) parameters: FSDP2/tensor parallelism")
    if training_args is not None:
        accumulation = getattr(training_args, "gradient_accumulation_steps", 1)
        if accumulation and accumulation > 1:
            problems.append(f"`gradient_accumulation_steps={accumulation}`: set it to 1 (and raise the batch size)")
        clip = getattr(training_args, "max_grad_norm", None)
        if clip:
            problems.append(
                f"`max_grad_norm={clip}` (global gradient clipping needs every gradient at once): set `max_grad_norm=0`"
            )
        if getattr(training_args, "fp16", False):
            problems.append("`fp16=True` (loss scaling unscales the gradients after the backward pass): use `bf16`")
        if getattr(training_args, "deepspeed", None):
            problems.append("DeepSpeed (`deepspeed=...`) owns the optimizer step")
        fsdp = getattr(training_args, "fsdp", None)
        if fsdp:
            problems.append(f"FSDP (`fsdp={fsdp!r}`): its gradient hooks never fire")
    if problems:
        raise CoFiTuneError(
            "`fused_backward=True` cannot honour: " + "; ".join(problems) + ". Use `fused_backward=False` there."
        )
