"""Every use of PEFT, transformers and torch internals in cofitune-peft, in one place, with the versions it was tested on.

1. Registration. PEFT has no plugin route for new methods: `register_peft_method` refuses any name that is not a member of the
`PeftType` str-enum, and transformers' adapter loading calls `peft_config.peft_type.value`, so the type must be a real
enum member. We add `PeftType.COFITUNE` at import time and then use the official registration. We also wrap
`PeftModel.save_pretrained` (atomic writes for CoFiTune adapters, and the base model's Hub id and task type filled in
first), `PeftModel.load_adapter` (a damaged or mismatched adapter file is refused with an error that names it),
`PeftModel.create_or_update_model_card` (a model card that says what was trained) and `PeftModel.push_to_hub`
(transformers' `PushToHubMixin.push_to_hub` overwrites the README that `save_pretrained` wrote with its generic
template or the repository's old card, so CoFiTune adapters are pushed by `cofitune_peft.hub.push_to_hub`); the
wrappers pass every other PEFT method through untouched.

2. `BufferDict`, PEFT's private per-adapter buffer container (`peft.tuners._buffer_dict`).

3. Gradient checkpointing. Trainer/TRL call `enable_input_require_grads()`, which registers forward hooks on the input
embeddings named `make_inputs_require_grads` (transformers keeps only the last handle), and whether checkpointing is
reentrant is only visible in `_gradient_checkpointing_func.keywords`. The functions below find and remove those hooks.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import tempfile

import peft
from packaging.version import Version
from peft.tuners._buffer_dict import BufferDict
from peft.utils import PeftType, register_peft_method
from torch import nn

from .errors import CoFiTuneError
from .utils import file_mode

__all__ = ["BufferDict"]

PEFT_TYPE_NAME = "COFITUNE"
PREFIX = "cofitune_"
# The releases these internals were verified against (tests/test_compat.py); outside them we warn rather than refuse.
TESTED_PEFT = (Version("0.21.0"), Version("0.22.0"))
TESTED = {"peft": "0.21.2", "transformers": "5.23", "torch": "2.13.0"}


def _add_enum_member(enum_cls, name: str):
    """Add `name` to a str-enum in place, the way `EnumType.__new__` would have, and return the member."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member.__init__(name)
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    return member


def peft_type():
    """The `PeftType.COFITUNE` member (added on first use)."""
    return _add_enum_member(PeftType, PEFT_TYPE_NAME)


def is_registered() -> bool:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return PEFT_TYPE_NAME in PeftType.__members__ and PeftType[PEFT_TYPE_NAME] in PEFT_TYPE_TO_CONFIG_MAPPING


def register(config_cls, model_cls, card_writer=None, before_save=None, push=None) -> None:
    """Register CoFiTune with PEFT; safe to call any number of times.

    `card_writer(peft_model, output_dir)` rewrites the model card after PEFT wrote its own;
    `before_save(peft_model, base_model_id)` runs before any PeftModel is saved (`base_model_id` is the keyword
    `save_pretrained` accepts on top of PEFT's, for CoFiTune adapters) and returns defaults for PEFT's keyword arguments;
    `push(peft_model, repo_id, **kwargs)` replaces `push_to_hub` for CoFiTune adapters.
    """
    import warnings

    version = Version(peft.__version__)
    if not (TESTED_PEFT[0] <= version < TESTED_PEFT[1]):
        warnings.warn(
            f"cofitune-peft was tested with peft>={TESTED_PEFT[0]},<{TESTED_PEFT[1]} but peft {version} is installed; "
            "the registration relies on PEFT internals, so run the test suite before trusting it.",
            stacklevel=3,
        )
    peft_type()
    if not is_registered():
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
    _wrap_peft_model(card_writer, before_save, push)


def _uses_cofitune(peft_model) -> bool:
    configs = getattr(peft_model, "peft_config", {}) or {}
    return any(getattr(cfg, "peft_type", None) == PEFT_TYPE_NAME for cfg in configs.values())


def _atomic_save_pretrained(original, before_save=None):
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, base_model_id=None, **kwargs):
        cofitune = _uses_cofitune(self)
        if base_model_id is not None and not cofitune:
            raise CoFiTuneError("`base_model_id` is a save_pretrained argument of CoFiTune adapters only.")
        if before_save is not None:  # for other methods it only fills PEFT defaults for a model it marked
            for key, value in (before_save(self, base_model_id) or {}).items():
                kwargs.setdefault(key, value)
        if not cofitune or kwargs.get("is_main_process", True) is False:
            return original(self, save_directory, *args, **kwargs)
        if os.path.isfile(save_directory):
            raise CoFiTuneError(
                f"`save_directory` must be a directory, got the file {save_directory!r}; pass a folder path."
            )
        parent = os.path.dirname(os.path.abspath(save_directory)) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".cofitune-save-", dir=parent)
        try:
            # The model card is merged with an existing README, so start the temp dir from it.
            readme = os.path.join(save_directory, "README.md")
            if os.path.isfile(readme):
                shutil.copy2(readme, os.path.join(tmp, "README.md"))
            original(self, tmp, *args, **kwargs)
            os.makedirs(save_directory, exist_ok=True)
            # Each file is replaced atomically; weights before the config that describes them. A crash leaves
            # every file either wholly old or wholly new.
            for root, _dirs, files in os.walk(tmp):
                rel = os.path.relpath(root, tmp)
                dest_root = save_directory if rel == "." else os.path.join(save_directory, rel)
                os.makedirs(dest_root, exist_ok=True)
                ordered = sorted(files, key=lambda n: (n.endswith(".json"), n == "README.md", n))
                for name in ordered:
                    # writers that go through mkstemp leave 0600; give published files the usual permissions
                    os.chmod(os.path.join(root, name), file_mode())
                    os.replace(os.path.join(root, name), os.path.join(dest_root, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    save_pretrained._cofitune_wrapped = True
    return save_pretrained


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _local_cofitune_weights(model_id, subfolder: str | None) -> str | None:
    """The weights file of a CoFiTune adapter saved in a local folder, or None (Hub ids, other PEFT methods)."""
    folder = os.path.join(os.fspath(model_id), subfolder or "")
    config = os.path.join(folder, ADAPTER_CONFIG)
    weights = os.path.join(folder, ADAPTER_WEIGHTS)
    if not (os.path.isfile(config) and os.path.isfile(weights)):
        return None
    try:
        with open(config) as f:
            peft_type = json.load(f).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None  # PEFT reports a broken config itself
    return weights if peft_type == PEFT_TYPE_NAME else None


def check_safetensors_file(path: str) -> None:
    """Raise `CoFiTuneError` naming `path` unless its header parses and its size matches the tensors it declares."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise ValueError(f"the header claims {length} bytes but the file has {size}")
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + length + end != size:
            raise ValueError(f"the tensors end at byte {8 + length + end} but the file has {size} bytes")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise CoFiTuneError(
            f"adapter file {path} is truncated or corrupt ({err}); save the adapter again or restore it from a copy."
        ) from err


def _checked_load_adapter(original):
    @functools.wraps(original)
    def load_adapter(self, model_id, *args, **kwargs):
        weights = _local_cofitune_weights(model_id, kwargs.get("subfolder"))
        if weights is None:
            return original(self, model_id, *args, **kwargs)
        check_safetensors_file(weights)
        try:
            return original(self, model_id, *args, **kwargs)
        except CoFiTuneError as err:
            if weights in str(err):
                raise
            raise CoFiTuneError(f"adapter file {weights}: {err}") from err

    load_adapter._cofitune_wrapped = True
    return load_adapter


def _model_card(original, card_writer):
    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir):
        original(self, output_dir)
        if _uses_cofitune(self) and card_writer is not None:
            card_writer(self, output_dir)

    create_or_update_model_card._cofitune_wrapped = True
    return create_or_update_model_card


def _push_to_hub(original, push):
    @functools.wraps(original)
    def push_to_hub(self, repo_id, *args, **kwargs):
        if not _uses_cofitune(self) or push is None:
            return original(self, repo_id, *args, **kwargs)
        if args:
            raise CoFiTuneError("pass push_to_hub's arguments after `repo_id` by keyword, e.g. `private=True`.")
        return push(self, repo_id, **kwargs)

    push_to_hub._cofitune_wrapped = True
    return push_to_hub


def _wrap_peft_model(card_writer, before_save=None, push=None) -> None:
    from peft import PeftModel

    if not getattr(PeftModel.save_pretrained, "_cofitune_wrapped", False):
        PeftModel.save_pretrained = _atomic_save_pretrained(PeftModel.save_pretrained, before_save)
    if not getattr(PeftModel.push_to_hub, "_cofitune_wrapped", False):
        PeftModel.push_to_hub = _push_to_hub(PeftModel.push_to_hub, push)
    if not getattr(PeftModel.load_adapter, "_cofitune_wrapped", False):
        PeftModel.load_adapter = _checked_load_adapter(PeftModel.load_adapter)
    if not getattr(PeftModel.create_or_update_model_card, "_cofitune_wrapped", False):
        PeftModel.create_or_update_model_card = _model_card(PeftModel.create_or_update_model_card, card_writer)


# ---------------------------------------------------------------------- gradient checkpointing

_INPUT_GRAD_HOOK_NAMES = ("make_inputs_require_grads", "make_inputs_require_grad")


def input_embeddings(model: nn.Module) -> list[nn.Module]:
    """Every module that some `get_input_embeddings()` inside `model` returns (where the input-grad hooks go)."""
    found = {}
    for m in model.modules():
        getter = getattr(m, "get_input_embeddings", None)
        if getter is None:
            continue
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(emb, nn.Module):
            found[id(emb)] = emb
    return list(found.values())


def input_grad_hooks(embeddings: list[nn.Module]) -> list[tuple[nn.Module, int]]:
    """The forward hooks that transformers/PEFT/TRL put on the input embeddings to make their output require grad."""
    return [
        (emb, hook_id)
        for emb in embeddings
        for hook_id, fn in emb._forward_hooks.items()
        if getattr(fn, "__name__", "") in _INPUT_GRAD_HOOK_NAMES
    ]


def remove_input_grad_hooks(model: nn.Module, found: list[tuple[nn.Module, int]]) -> None:
    """Remove the hooks `input_grad_hooks` found, and the handles transformers keeps of them."""
    for embedding, hook_id in found:
        # transformers keeps only the handle of its last `enable_input_require_grads` call (and checkpointing
        # calls it too), so earlier hooks cannot be removed through their handles: drop them by identity.
        for registry in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            getattr(embedding, registry, {}).pop(hook_id, None)
    for owner in model.modules():
        if getattr(owner, "_require_grads_hooks", None):
            owner._require_grads_hooks = []


def reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether `model` has gradient checkpointing on with torch's reentrant implementation."""
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            func = m._gradient_checkpointing_func
            keywords = getattr(func, "keywords", {}) or {}
            # torch.utils.checkpoint treats a missing use_reentrant as True (with a warning)
            return keywords.get("use_reentrant", True) is not False
    return False


# ---------------------------------------------------------------------- mixed-adapter batches (peft 0.21.2)
# `PeftModel.forward`/`generate` pass `adapter_names=` to the tuner's `_enable_peft_forward_hooks` context manager
# (peft/peft_model.py); LoRA (peft/tuners/lora/model.py) injects them into every tuner layer and every
# `AuxiliaryTrainingWrapper` (modules_to_save, trainable tokens) through forward pre-hooks. We do the same.


def mixed_batch_modules(model: nn.Module, layer_cls: type) -> list[nn.Module]:
    """The modules of `model` that take `adapter_names=`: tuner layers of `layer_cls` and PEFT's auxiliary wrappers."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [m for m in model.modules() if isinstance(m, (layer_cls, AuxiliaryTrainingWrapper))]


def adapter_names_pre_hook(module: nn.Module, args, kwargs, adapter_names: list[str]):
    """Forward pre-hook (`with_kwargs=True`) that adds `adapter_names` to the module's forward kwargs."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


# ---------------------------------------------------------------------- autocast and quantized bases
#
# 4. The lean masked linear (layer.py) does its own casting, so it reads the autocast state of the input's device
# (`torch.is_autocast_enabled(device_type)` / `torch.get_autocast_dtype`, torch >= 2.4).
#
# 5. Quantized bases. bitsandbytes `Linear4bit` (weight `Params4bit`: two 4-bit values per byte, the real shape in
# `weight.quant_state.shape`) and `Linear8bitLt` (weight `Int8Params` [out, in] with row scales `SCB`, tested with
# bitsandbytes 0.50.2 on CPU) are supported; we dequantize with PEFT's `dequantize_bnb_weight` and requantize the way
# PEFT's LoRA bnb layers do (peft/tuners/lora/bnb.py). Every other quantization library is recognised by the module
# path or class name of the layer or of its weight, without importing it, and refused by name.

TESTED["bitsandbytes"] = "0.50.2"


def autocast_dtype(device_type: str):
    """The dtype autocast computes in on `device_type`, or None when autocast is off there."""
    import torch

    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


BNB_4BIT = "bitsandbytes 4-bit"
BNB_8BIT = "bitsandbytes 8-bit"

# (library, how its layers and weights are named): module-path prefixes and class-name prefixes
_QUANTIZED_LIBRARIES = (
    ("GPTQ", ("auto_gptq", "gptqmodel", "optimum.gptq", "exllama"), ("QuantLinear", "GPTQ", "Exllama", "Marlin")),
    ("AWQ", ("awq", "autoawq"), ("WQLinear", "AWQ")),
    ("HQQ", ("hqq",), ("HQQLinear",)),
    ("EETQ", ("eetq",), ("EetqLinear", "EETQ")),
    ("torchao", ("torchao",), ()),
    ("quanto", ("optimum.quanto", "quanto"), ("QLinear", "QBytesTensor", "WeightQBytesTensor")),
    ("AQLM", ("aqlm",), ("QuantizedLinear",)),
    ("compressed-tensors", ("compressed_tensors",), ("CompressedLinear",)),
    ("FP8", (), ("FP8Linear", "FbgemmFp8Linear", "Fp8Linear")),
    ("bitsandbytes", ("bitsandbytes",), ()),
)
_PLAIN_FLOAT = ("float16", "bfloat16", "float32", "float64")


def _named_by(obj, prefixes: tuple[str, ...], class_prefixes: tuple[str, ...]) -> bool:
    cls = type(obj)
    path = cls.__module__ or ""
    return any(path == p or path.startswith(p + ".") for p in prefixes) or cls.__name__.startswith(class_prefixes)


def quantization_of(module: nn.Module) -> str | None:
    """`BNB_4BIT`, `BNB_8BIT`, another library's name (GPTQ, AWQ, ...) or None for a plain floating-point weight."""
    weight = getattr(module, "weight", None)
    weight_cls = type(weight).__name__
    if _named_by(module, ("bitsandbytes",), ()):
        if weight_cls == "Params4bit":
            return BNB_4BIT
        if weight_cls == "Int8Params":
            return BNB_8BIT
    for library, prefixes, class_prefixes in _QUANTIZED_LIBRARIES:
        if _named_by(module, prefixes, class_prefixes) or (weight is not None and _named_by(weight, prefixes, ())):
            return library
    if hasattr(module, "qweight") or hasattr(module, "W_q"):  # GPTQ/AWQ-style packed weights, HQQ
        return "an unknown quantization library"
    if weight is not None and str(getattr(weight, "dtype", "")).replace("torch.", "") not in _PLAIN_FLOAT:
        return "an unknown quantization library"
    return None


def unsupported_quantization_message(key: str, module: nn.Module, library: str) -> str:
    cls = type(module)
    weight = getattr(module, "weight", None)
    found = f"`{cls.__module__}.{cls.__qualname__}`"
    if weight is not None:
        found += f" with a {type(weight).__name__} weight of dtype {getattr(weight, 'dtype', '?')}"
    return (
        f"module {key!r} is {found}, quantized by {library}; CoFiTune trains a full-size delta on a plain "
        "floating-point or bitsandbytes base weight and cannot read this layer's packed weight. Load the model in "
        "bf16/fp32 (`torch_dtype=torch.bfloat16`, no `quantization_config`), or quantize it with bitsandbytes "
        "(`BitsAndBytesConfig(load_in_4bit=True)` or `load_in_8bit=True`), which CoFiTune supports."
    )


def weight_shape(weight):
    """A weight's logical shape: a bitsandbytes 4-bit weight stores [out * in / 2, 1] bytes, its real shape lives in
    `quant_state.shape`; under DeepSpeed ZeRO-3 the local tensor is empty and the shape is `ds_shape`."""
    import torch

    shape = getattr(weight, "ds_shape", None)
    if shape is not None:
        return torch.Size(shape)
    quant_state = getattr(weight, "quant_state", None)
    if type(weight).__name__ == "Params4bit" and getattr(quant_state, "shape", None) is not None:
        return torch.Size(quant_state.shape)
    return weight.shape


def bnb_compute_dtype(module: nn.Module):
    """The dtype a bitsandbytes 4-bit layer computes in (None: the input's dtype, and for 8-bit layers)."""
    return getattr(module, "compute_dtype", None)


def dequantize_bnb(module: nn.Module):
    """The dense weight [out, in] of a bitsandbytes `Linear4bit`/`Linear8bitLt` (a new tensor)."""
    from peft.utils.integrations import dequantize_bnb_weight

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        _unpack_bnb_cpu(weight)
        return dequantize_bnb_weight(weight, state=weight.quant_state)
    state = module.state
    if state.SCB is None:
        state.SCB = weight.SCB
    return dequantize_bnb_weight(weight, state=state)


def requantize_bnb(module: nn.Module, dense) -> None:
    """Replace the weight of a bitsandbytes layer by `dense` [out, in], quantized with the layer's own settings."""
    import bitsandbytes as bnb

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs["bnb_quantized"] = False
        kwargs["requires_grad"] = False
        module.weight = bnb.nn.Params4bit(dense.to("cpu"), **kwargs).to(weight.device)
    else:
        module.weight = bnb.nn.Int8Params(
            dense.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights
        ).to(weight.device)
        module.state.reset_grads()


def _unpack_bnb_cpu(weight) -> None:
    """bitsandbytes 0.50 repacks a 4-bit weight in place for its CPU kernels at the first eval-mode forward without
    gradients (`quant_state.packing_format_for_cpu`); dequantizing needs the standard layout back."""
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


# ---------------------------------------------------------------------- PEFT's module matcher (peft 0.21.2)
# `target_modules` keeps PEFT's meaning in a CoFiTune config: module names matched the way
# `peft.tuners.tuners_utils.check_target_module_exists` matches them (the full name or its last components, with
# `layers_to_transform` and `layers_pattern`; a string is a regex). We call PEFT's own function so the meaning cannot
# drift; it reads `target_modules`, `target_parameters`, `layers_to_transform`, `layers_pattern`, `exclude_modules`
# and `modules_to_save` off the object it is given.


def peft_target_matches(config, key: str) -> bool:
    """Whether PEFT's matcher selects module `key` for `config` (a config, or a dict with `target_modules`,
    `layers_to_transform`, `layers_pattern`)."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    get = config.get if isinstance(config, dict) else lambda name, default=None: getattr(config, name, default)
    shim = SimpleNamespace(
        target_modules=get("target_modules"),
        target_parameters=None,
        layers_to_transform=get("layers_to_transform"),
        layers_pattern=get("layers_pattern"),
        exclude_modules=None,
        modules_to_save=None,
    )
    if shim.target_modules is None:
        return True
    return bool(check_target_module_exists(shim, key))
