"""`CoFiTuneConfig`: the PEFT config of CoFiTune (Zhang et al., ACL 2024 Findings, arXiv 2404.10306)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from peft import PeftConfig

from . import _compat
from .architectures import ROLES, SHORTHANDS, UNITS
from .errors import CoFiTuneError
from .importance import Importance

SOFTMASK_MODES = ("update", "gradient", "none")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
DELTA_DTYPES = SAVE_DTYPES
MASK_BUDGETS = ("raw", "mean_one")


@dataclass
class CoFiTuneConfig(PeftConfig):
    """Configuration of a CoFiTune adapter: which layers and modules train, and how the soft mask acts.

    CoFiTune trains chosen modules (by default the FFN up and down projections) inside a contiguous window of decoder
    layers, freezes everything else, and scales each trained row's change by `1 - I`, where `I` is the importance of
    the unit it feeds for general ability ("versatility").

    Args:
        layers (`tuple[int, int]`, *optional*, defaults to `None`):
            The paper's window "(a, b]", i.e. the 0-based layers `a .. b-1` (`range(a, b)`). `None` picks the paper's
            default `(N // 4, N // 2)` for an N-layer model; the resolved window is written back and saved.
            The contiguous shorthand of `layers_to_transform`.
        layers_to_transform (`list[int] | int`, *optional*, defaults to `None`):
            PEFT's name for the layers to adapt: any list of 0-based decoder-layer indices (or one index), e.g.
            `[2, 3, 7]`. Giving both `layers` and `layers_to_transform` is an error unless they name the same layers.
            When the indices are contiguous, `layers` is filled in with the equivalent window once the adapter is
            built.
        parts (`str | list[str]`, *optional*, defaults to `None`):
            CoFiTune's selection: which parts of the window's layers train. A shorthand (`"ffn"`: up and down
            projections, as the paper; `"ffn+gate"`; `"mha"`: q, k, v; `"ffn+mha"`; `"mha+o"`; `"all"`), a list of roles
            (`"q"`, `"k"`, `"v"`, `"o"`, `"gate"`, `"up"`, `"down"`), or a list of module names inside a decoder layer
            (e.g. `["mlp.up_proj", "mlp.down_proj"]`). Roles cover the experts of mixture-of-experts layers too (their
            fused `gate_up_proj`/`down_proj` parameters, one delta per expert). `None`: `"ffn"`, or every role when
            `target_modules` names modules.
        target_modules (`str | list[str]`, *optional*, defaults to `None`):
            PEFT's meaning: module names (a list, matched as PEFT's matcher does: the full name or its last
            components, together with `layers_to_transform` and `layers_pattern`) or a regex (a string), restricting
            `parts` to the modules they name. After the adapter is built it holds the names PEFT's matcher resolves to
            exactly the wrapped modules (so PEFT utilities such as `convert_to_lora` read it as they read a LoRA's). A
            CoFiTune shorthand or list of roles here (the meaning of 0.1/0.2, `target_modules="ffn"`) is moved to
            `parts`.
        importance (`str`, *optional*, defaults to `None`):
            A path to an importance file written by `Importance.save` (or `cofitune importance`). `None` trains
            without a soft mask (the coarse level only), or with the mask that `set_importance(model, importance)` or
            `CoFiTuneCallback` installs later. Only the per-row scales derived from it are stored in the adapter. As a
            convenience an in-memory `Importance` is accepted too: `get_peft_model` consumes it, and it is never
            serialised (the config keeps its description in `importance_source`).
        softmask_mode (`str`, *optional*, defaults to `"update"`):
            `"update"` scales the weight *change*: the optimizer computes its step from W's true gradient and each
            row moves `1 - I` times that step (W = W0 + (1 - I) * Delta, with Delta receiving W's gradient), which
            works under AdamW, SGD or any optimizer; `"gradient"` scales the gradient (the paper's placement; Adam
            divides a constant per-row factor out again, so under AdamW it is close to a no-op unless a unit's
            importance is ~1: keep it for ablations and SGD); `"none"` ignores the importance.
        mask_budget (`str`, *optional*, defaults to `"raw"`):
            How much step the mask leaves. `"raw"`: each trained row's scale is `s = 1 - I` (the paper's mask; its mean
            is well below 1, about 0.46 on SmolLM2, so a masked run at learning rate lr spends roughly the step budget of
            an unmasked run at 0.46 lr). `"mean_one"`: the same shape rescaled by one factor per adapter, so that the
            mean scale over all trained rows of all the adapter's modules is 1, each row capped at `mask_cap` (rows
            with `I = 1` stay frozen). The rescaled factors are what the adapter file stores.
        mask_cap (`float`, *optional*, defaults to `4.0`):
            With `mask_budget="mean_one"`: the largest scale a row may get (>= 1). Rows that hit the cap are held there
            and the others are rescaled again until the mean is 1; when too few rows can move for that (fewer than
            1 / `mask_cap` of them unfrozen), every movable row sits at the cap and the mean stays below 1 (a warning
            says so).
        strength (`float`, *optional*, defaults to `1.0`):
            Scales the trained change at every use: `W = W0 + strength * s * Delta` in the forward pass, in `merge`,
            `get_delta_weight`, mixed-adapter batches and LoRA export (WiSE-FT for the adapter: `strength=0` is the
            base model, `1` the trained adapter, values in between trace a curve from one training run). It also
            multiplies the forward pass during training (Delta still receives W's gradient, so the weight moves
            `strength` times the optimizer's step). Change it after training with `CoFiTuneModel.set_strength`.
        unit_map (`dict[str, str]`, *optional*, defaults to `None`):
            For layers CoFiTune cannot read by itself: module name inside a decoder layer -> unit it feeds
            (`"intermediate"`, `"output"`, `"head"`, `"kv_head"`, `"head@in"` for columns grouped by head, or `"none"`).
            The units give the roles `parts` selects by (`intermediate` -> up, `output` -> down, `head` -> q,
            `kv_head` -> k and v, `head@in` -> o); a module can also be selected by its name.
        layers_pattern (`str`, *optional*, defaults to `None`):
            The name of the decoder-layer `ModuleList` (`"layers"`, `"h"`, or a dotted path such as
            `"model.language_model.layers"`); only needed when a model has several layer stacks. Filled in once the
            adapter is built.
        delta_dtype (`str`, *optional*, defaults to `None`):
            The dtype the trained deltas are created, trained and saved in: `"float32"`, `"bfloat16"` or `"float16"`,
            whatever PEFT's `autocast_adapter_dtype` says (it is applied after PEFT's cast, when the adapter is built
            and when it is loaded). `None` keeps PEFT's behaviour: the base weight's dtype, which PEFT's default
            `autocast_adapter_dtype=True` upcasts to float32 for a bf16/fp16 base. In bf16 the deltas, their gradients
            and (with `torch.optim.AdamW`) the optimizer states take half the memory of fp32; the delta starts at zero
            and stays small, so its rounding is far finer than that of the weight it is added to. To keep small steps
            that plain rounding would drop, train with `CoFiTuneAdamW` (stochastic rounding), see docs/memory.md.
        save_dtype (`str`, *optional*, defaults to `None`):
            Store the trained deltas as `"bfloat16"`/`"float16"` to halve the adapter file (they load back into the
            training dtype). `None` keeps the parameter dtype (the deltas' dtype, so bf16 deltas save as bf16 and
            load back bit for bit).
        fix_input_grads (`bool`, *optional*, defaults to `True`):
            Remove the input-require-grads hook that Trainer/TRL add for gradient checkpointing, so that layers below
            the window stay out of the backward pass (with reentrant checkpointing the window's first layer input is
            made to require grad instead).
        init_weights (`bool`, *optional*, defaults to `True`):
            `True` starts every delta at zero (the adapted model equals the base). `False` draws small random deltas,
            for tests only.
        modules_to_save (`list[str]`, *optional*, defaults to `None`):
            Extra modules to train fully and save (e.g. a classification head), as in other PEFT methods.
        training_info (`dict`, *optional*, defaults to `None`):
            How the adapter was trained, for its model card (JSON values: `trainer`, `steps`, `learning_rate`,
            `batch_size`, `optimizer`, `seed`, ...; `base_weights` when the base model's weights are not the Hub's).
            Filled by `CoFiTuneCallback` and the kit's `train_sft`; informational, never read by the method.

    Example:

    ```python
    >>> from cofitune_peft import CoFiTuneConfig
    >>> CoFiTuneConfig(layers=(10, 20)).layers
    (10, 20)
    >>> CoFiTuneConfig(layers_to_transform=[12, 3, 7]).layer_indices()
    [3, 7, 12]
    ```
    """

    layers: tuple[int, int] | None = field(
        default=None,
        metadata={"help": "0-based window (a, b): trains layers a..b-1. None: (N//4, N//2) of an N-layer model."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "0-based decoder-layer indices to train (any list, or one int); PEFT's name for `layers`."},
    )
    parts: str | list[str] | None = field(
        default=None,
        metadata={"help": "'ffn', 'ffn+gate', 'mha', 'ffn+mha', 'mha+o', 'all', a list of roles or of module names."},
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={"help": "PEFT's meaning: module names or a regex restricting `parts`; the wrapped modules after."},
    )
    importance: str | None = field(
        default=None, metadata={"help": "Path to an importance file (Importance.save), or None (no soft mask yet)."}
    )
    softmask_mode: str = field(
        default="update", metadata={"help": "'update' (works under AdamW), 'gradient' (the paper's), or 'none'."}
    )
    mask_budget: str = field(
        default="raw",
        metadata={"help": "'raw' (scale 1 - I) or 'mean_one' (the same shape, mean scale 1 over trained rows)."},
    )
    mask_cap: float = field(
        default=4.0, metadata={"help": "Largest per-row scale under mask_budget='mean_one' (>= 1)."}
    )
    strength: float = field(
        default=1.0,
        metadata={"help": "W = W0 + strength * s * Delta: scales the trained change (0: the base model)."},
    )
    unit_map: dict[str, str] | None = field(
        default=None, metadata={"help": "Module name -> unit, for architectures without a built-in layout."}
    )
    layers_pattern: str | None = field(default=None, metadata={"help": "Name of the decoder-layer ModuleList."})
    delta_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Dtype of the trained deltas: float32/bfloat16/float16 (None: PEFT's, fp32 on a bf16 base)."
        },
    )
    save_dtype: str | None = field(
        default=None, metadata={"help": "Dtype of the saved deltas: float32/bfloat16/float16."}
    )
    fix_input_grads: bool = field(
        default=True, metadata={"help": "Keep layers below the window out of the backward pass under checkpointing."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Zero deltas (True) or small random ones (tests)."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train and save."})
    importance_source: str | None = field(
        default=None, metadata={"help": "Where the saved mask came from (set automatically; informational)."}
    )
    training_info: dict | None = field(
        default=None, metadata={"help": "How the adapter was trained, for its model card (set automatically)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = _compat.peft_type()
        problems = []
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        if self.layers is not None:
            ok = (
                isinstance(self.layers, tuple)
                and len(self.layers) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers)
            )
            if not ok:
                problems.append(f"`layers` must be None or a pair of ints (a, b), got {self.layers!r}.")
            elif self.layers[0] < 0:
                problems.append(f"`layers` must start at 0 or later, got {self.layers!r}.")
            elif self.layers[1] <= self.layers[0]:
                problems.append(
                    f"`layers` must be a non-empty window (a, b) with a < b (it trains layers a..b-1), "
                    f"got {self.layers!r}."
                )
        problems += self._check_layers_to_transform()
        problems += self._check_target_modules()
        if self.softmask_mode not in SOFTMASK_MODES:
            problems.append(f"`softmask_mode` must be one of {SOFTMASK_MODES}, got {self.softmask_mode!r}.")
        problems += self._check_mask_strength()
        if self.importance is not None and not isinstance(self.importance, (Importance, str, os.PathLike)):
            problems.append(
                "`importance` must be None, a path to an importance file or an `Importance`, "
                f"got {type(self.importance).__name__}."
            )
        if isinstance(self.importance, os.PathLike):
            self.importance = os.fspath(self.importance)
        elif isinstance(self.importance, Importance):
            # Consumed by `get_peft_model`, never serialised: the config holds hyperparameters only.
            self._pending_importance = self.importance
            self.importance_source = describe_importance(self.importance)
            self.importance = None
        if self.unit_map is not None:
            if not isinstance(self.unit_map, dict) or not self.unit_map:
                problems.append(f"`unit_map` must be a non-empty dict of module name -> unit, got {self.unit_map!r}.")
            else:
                allowed = (*UNITS, "head@in", "none")
                for name, unit in self.unit_map.items():
                    if unit not in allowed:
                        problems.append(f"`unit_map[{name!r}]` must be one of {allowed}, got {unit!r}.")
        if self.save_dtype is not None and self.save_dtype not in SAVE_DTYPES:
            problems.append(f"`save_dtype` must be None or one of {SAVE_DTYPES}, got {self.save_dtype!r}.")
        if self.delta_dtype is not None and self.delta_dtype not in DELTA_DTYPES:
            problems.append(
                f"`delta_dtype` must be None (PEFT's choice: fp32 on a bf16/fp16 base) or one of {DELTA_DTYPES}, "
                f"got {self.delta_dtype!r}."
            )
        if self.training_info is not None and not isinstance(self.training_info, dict):
            problems.append(f"`training_info` must be None or a dict of JSON values, got {self.training_info!r}.")
        for flag in ("fix_input_grads", "init_weights"):
            if not isinstance(getattr(self, flag), bool):
                problems.append(f"`{flag}` must be True or False, got {getattr(self, flag)!r}.")
        if problems:
            raise CoFiTuneError("Invalid CoFiTuneConfig:\n  - " + "\n  - ".join(problems))

    def _check_mask_strength(self) -> list[str]:
        problems = []
        if self.mask_budget not in MASK_BUDGETS:
            problems.append(f"`mask_budget` must be one of {MASK_BUDGETS}, got {self.mask_budget!r}.")
        if not _is_real(self.mask_cap) or not self.mask_cap >= 1.0:
            problems.append(
                f"`mask_cap` must be a finite number >= 1 (the largest per-row scale under "
                f"`mask_budget='mean_one'`), got {self.mask_cap!r}."
            )
        else:
            self.mask_cap = float(self.mask_cap)
        problems += strength_problems(self.strength)
        if not problems:
            self.strength = float(self.strength)
        return problems

    def _check_layers_to_transform(self) -> list[str]:
        ltt = self.layers_to_transform
        if ltt is None:
            return []
        if isinstance(ltt, int) and not isinstance(ltt, bool):
            ltt = [ltt]
        elif isinstance(ltt, (tuple, range, set, frozenset)):
            ltt = list(ltt)
        if (
            not isinstance(ltt, list)
            or not ltt
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ltt)
        ):
            return [
                "`layers_to_transform` must be None, a layer index or a non-empty list of layer indices, "
                f"got {self.layers_to_transform!r}."
            ]
        negative = sorted({i for i in ltt if i < 0})
        if negative:
            return [f"`layers_to_transform` indices must be 0 or more, got {negative}."]
        self.layers_to_transform = sorted(set(ltt))
        window = self.layers
        window_ok = isinstance(window, tuple) and len(window) == 2 and all(isinstance(x, int) for x in window)
        if window_ok and window[0] < window[1] and set(range(*window)) != set(ltt):
            a, b = self.layers
            return [
                f"`layers`={self.layers!r} (layers {a}..{b - 1}) and `layers_to_transform`="
                f"{self.layers_to_transform} name different layers; give only one of them."
            ]
        return []

    def layer_indices(self) -> list[int] | None:
        """The decoder layers this config trains, sorted (None: the paper's default window, resolved on a model)."""
        if self.layers_to_transform is not None:
            return list(self.layers_to_transform)
        if self.layers is not None:
            return list(range(*self.layers))
        return None

    def _check_target_modules(self) -> list[str]:
        """Validate `parts` and `target_modules`, moving a CoFiTune selection given as `target_modules` to `parts`."""
        problems = []
        tm, parts = self.target_modules, self.parts
        if isinstance(tm, (set, tuple, frozenset)):
            tm = sorted(tm) if all(isinstance(x, str) for x in tm) else list(tm)
        if isinstance(parts, (set, tuple, frozenset)):
            parts = sorted(parts) if all(isinstance(x, str) for x in parts) else list(parts)
        if parts is None and _is_selection(tm):
            parts, tm = tm, None  # the meaning of 0.1 and 0.2: `target_modules="ffn"`
        elif parts is None and tm == "all-linear":
            parts, tm = "all", None
        if tm is not None and not (isinstance(tm, str) and tm) and not _is_names(tm):
            problems.append(
                "`target_modules` must be None, module names (a non-empty list of strings) or a regex (a string), "
                f"got {self.target_modules!r}."
            )
        elif isinstance(tm, str) and not _is_regex(tm):
            problems.append(
                f"`target_modules` is a string, which PEFT reads as a regex over module names, but {tm!r} is not a "
                "valid regex; pass module names as a list, or fix the regex."
            )
        if parts is None:
            parts = "ffn" if tm is None else "all"
        if isinstance(parts, str):
            if parts not in SHORTHANDS and parts not in ROLES:
                problems.append(
                    f"`parts` must be one of the shorthands {sorted(SHORTHANDS)}, a role {ROLES}, or a list of roles "
                    f"or module names, got {parts!r}."
                )
        elif not _is_names(parts):
            problems.append(
                f"`parts` must be a shorthand string or a non-empty list of roles or names, got {parts!r}."
            )
        self.parts, self.target_modules = parts, tm
        return problems

    def roles_and_names(self) -> tuple[frozenset[str], frozenset[str]]:
        """The selected roles, and the module names inside a decoder layer that `parts` lists."""
        parts = self.parts if self.parts is not None else "ffn"
        if isinstance(parts, str):
            return (SHORTHANDS[parts] if parts in SHORTHANDS else frozenset({parts})), frozenset()
        roles = frozenset(x for x in parts if x in ROLES)
        names = frozenset(x for x in parts if x not in ROLES)
        return roles, names

    def to_dict(self) -> dict:
        """PEFT's dict, with an importance path moved to `importance_source`.

        The importance is consumed when the adapter is built and its per-row scales are saved in the adapter file, so
        loading an adapter never needs (or reads) the importance file.
        """
        out = super().to_dict()
        if out.get("importance") is not None:
            out["importance_source"] = out.get("importance_source") or out["importance"]
            out["importance"] = None
        return out

    def pending_importance(self) -> Importance | str | None:
        """The importance `get_peft_model` installs: an in-memory one handed to the config, else the path."""
        return getattr(self, "_pending_importance", None) or self.importance


def _is_names(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, str) and x for x in value)


def _is_regex(value: str) -> bool:
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def _is_selection(value) -> bool:
    """A CoFiTune selection (a shorthand, a role, or a list holding a role): `target_modules` of 0.1 and 0.2."""
    if isinstance(value, str):
        return value in SHORTHANDS or value in ROLES
    return _is_names(value) and any(x in ROLES or x in SHORTHANDS for x in value)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def strength_problems(value) -> list[str]:
    """The complaint about a bad `strength` (empty when it is a finite number)."""
    if _is_real(value):
        return []
    return [
        f"`strength` must be a finite number (W = W0 + strength * s * Delta: 0 is the base model, 1 the trained "
        f"adapter), got {value!r}."
    ]


def describe_importance(importance: Importance) -> str:
    """A one-line provenance of an importance, for the config and the model card."""
    meta = importance.metadata
    if "source" in meta:
        return meta["source"]
    bits = [f"{k}={meta[k]}" for k in ("model", "data", "num_tokens") if k in meta]
    return "in-memory Importance" + (f" ({', '.join(bits)})" if bits else "")
