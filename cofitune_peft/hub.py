"""Publishing CoFiTune adapters on the Hugging Face Hub: the base model's Hub id, the task type, and `push_to_hub`.

An adapter names its base model in `adapter_config.json` (`base_model_name_or_path`, which
`AutoPeftModelForCausalLM.from_pretrained` loads) and in its card's metadata (`base_model`, which the Hub links). Every
save of a CoFiTune adapter records there the base model's Hub id wherever it is known:

1. `base_model_id="owner/name"` passed to `save_pretrained` or `push_to_hub`, or set on the model before
   `get_peft_model` with `set_base_model_id` (the kit does this for its embedded SmolLM2, whose weights come from a
   GGUF file, and for `--base-model-id`);
2. a model loaded from a Hub id keeps that id (PEFT records it);
3. a model loaded from a local folder: the id of a Hugging Face cache snapshot
   (`.../models--owner--name/snapshots/<revision>`), else the `_name_or_path` in the folder's `config.json` when that
   is a Hub id; otherwise the local path stays (so `AutoPeftModelForCausalLM` still loads the adapter on this
   machine), the card omits `base_model`, and `push_to_hub` warns once, naming `base_model_id`.

A CoFiTune adapter on a causal LM is saved with `task_type="CAUSAL_LM"`, whichever way it was trained.

`PeftModel.push_to_hub` of a CoFiTune adapter commits what `save_for_hub` writes (README.md, adapter_config.json,
adapter_model.safetensors) in one commit, with the card this package writes. (transformers' own `push_to_hub` would
replace that card with its generic template, or with the card already in the repository.)
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .config import CoFiTuneConfig
from .errors import CoFiTuneError

logger = logging.getLogger(__name__)

#: The attribute `set_base_model_id` puts on a model: how its weights differ from the Hub's (shown in the card).
BASE_NOTE_ATTRIBUTE = "cofitune_base_weights"
#: ... and the folder its weights were read from (PEFT's vocabulary check reads that folder's config, not the Hub's).
LOADED_FROM_ATTRIBUTE = "cofitune_loaded_from"
_WARNED: set[tuple[str, str]] = set()
# What a push knows and `save_pretrained` does not: the repository id (for the card's code) and extra tags.
_PUBLISHING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("cofitune_publishing", default=None)


@contextlib.contextmanager
def publishing(repo_id: str | None, tags: list[str] | None = None) -> Iterator[None]:
    """Within this block the model cards that `save_pretrained` writes name `repo_id` in their code and carry `tags`."""
    token = _PUBLISHING.set({"repo_id": repo_id, "tags": list(tags or [])})
    try:
        yield
    finally:
        _PUBLISHING.reset(token)


def publishing_context() -> dict:
    """`{"repo_id": ..., "tags": [...]}` inside `publishing`, else `{}`."""
    return _PUBLISHING.get() or {}


def is_hub_id(name) -> bool:
    """Whether `name` reads as a Hugging Face Hub model id (`"owner/name"` or a legacy `"name"`) and is no local path."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or name.startswith((".", "~")):
        return False
    if name.count("/") > 1 or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_id_of(name_or_path) -> str | None:
    """The Hub id behind a model's `name_or_path`: itself when it is one; for a local folder the id of a Hugging Face
    cache snapshot, or the `_name_or_path` of its `config.json` when that is an id; else None."""
    if not name_or_path:
        return None
    name = os.fspath(name_or_path)
    path = os.path.expanduser(name)
    if not os.path.isdir(path):
        return name if is_hub_id(name) else None
    snapshots = os.path.dirname(os.path.abspath(path))
    repo_folder = os.path.basename(os.path.dirname(snapshots))
    if os.path.basename(snapshots) == "snapshots" and repo_folder.startswith("models--"):
        repo = repo_folder[len("models--") :].replace("--", "/")
        if is_hub_id(repo):
            return repo
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                recorded = json.load(f).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            return None
        if is_hub_id(recorded):
            return recorded
    return None


def check_hub_id(value, parameter: str) -> str:
    """`value` if it is a Hub model id, else `CoFiTuneError` naming `parameter`."""
    if isinstance(value, str) and "/" in value and is_hub_id(value):
        return value
    raise CoFiTuneError(
        f"`{parameter}` must be the base model's Hugging Face Hub id, 'owner/name' (e.g. "
        f"'HuggingFaceTB/SmolLM2-135M-Instruct'), got {value!r}."
    )


def set_base_model_id(model, model_id: str, *, weights_note: str | None = None) -> None:
    """Record that `model` (a transformers model, before `get_peft_model`) is the Hub model `model_id`.

    Adapters built on it then carry `model_id` as `base_model_name_or_path` and as the card's `base_model`, whatever
    folder the weights were read from. `weights_note` says how these weights differ from the Hub's (e.g. dequantised
    from a GGUF file); the card shows it.

    Example:

    ```python
    from cofitune_peft.hub import set_base_model_id

    model = AutoModelForCausalLM.from_pretrained("/data/models/smollm2")  # a local copy
    set_base_model_id(model, "HuggingFaceTB/SmolLM2-135M-Instruct")
    peft_model = get_peft_model(model, CoFiTuneConfig())
    ```
    """
    check_hub_id(model_id, "model_id")
    loaded_from = model.__dict__.get("name_or_path") or None
    if loaded_from and os.path.isdir(os.path.expanduser(loaded_from)):
        setattr(model, LOADED_FROM_ATTRIBUTE, loaded_from)
    model.name_or_path = model_id
    setattr(model, BASE_NOTE_ATTRIBUTE, weights_note)


def is_causal_lm(model) -> bool:
    """Whether `model` (a PeftModel, a tuner or a transformers model) is a causal language model."""
    from peft import PeftModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if isinstance(model, PeftModelForCausalLM):
        return True
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    return name.endswith("ForCausalLM") or name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def prepare_for_save(peft_model, base_model_id: str | None = None) -> dict:
    """Fill in what a CoFiTune adapter's files record about its base model: the Hub id (module docstring), the task
    type `CAUSAL_LM` for a causal LM, and the note `set_base_model_id` left on the base model. Adapters of other PEFT
    methods are left as they are.

    Returns keyword arguments for PEFT's `save_pretrained`: when an adapter now names a Hub id but its base was read
    from a local folder, `save_embedding_layers` is decided against that folder's config, as PEFT did before the id
    replaced the folder (PEFT's own "auto" would fetch the config from the Hub, from a machine that may be offline).
    """
    if base_model_id is not None:
        check_hub_id(base_model_id, "base_model_id")
    base = peft_model.get_base_model()
    marked_folder = getattr(base, LOADED_FROM_ATTRIBUTE, None)
    loaded_from = marked_folder or base.__dict__.get("name_or_path") or None
    note = getattr(base, BASE_NOTE_ATTRIBUTE, None)
    causal = is_causal_lm(peft_model)
    local_folders = set()
    for name, cfg in peft_model.peft_config.items():
        if not isinstance(cfg, CoFiTuneConfig):
            # another method (a LoRA on the embedded SmolLM2): PEFT records the id `set_base_model_id` set; its
            # vocabulary check then reads the folder the weights came from, as for CoFiTune below
            if marked_folder and hub_id_of(cfg.base_model_name_or_path):
                local_folders.add(os.path.expanduser(marked_folder))
            continue
        recorded = cfg.base_model_name_or_path or loaded_from
        found = base_model_id or hub_id_of(recorded)
        if found and found != recorded:
            logger.info(
                "adapter %r: recording the base model as the Hub id %r (loaded from %r)", name, found, recorded
            )
        cfg.base_model_name_or_path = found or recorded
        if found:
            for folder in (recorded, loaded_from):
                if folder and os.path.isfile(os.path.join(os.path.expanduser(folder), "config.json")):
                    local_folders.add(os.path.expanduser(folder))
                    break
        if cfg.task_type is None and causal:
            cfg.task_type = "CAUSAL_LM"
        if note and found and not (cfg.training_info or {}).get("base_weights"):
            cfg.training_info = {**(cfg.training_info or {}), "base_weights": note}
    config = getattr(base, "config", None)
    if len(local_folders) != 1 or config is None:
        return {}
    vocab_size = getattr(config, "vocab_size", None)
    original = type(config).from_pretrained(local_folders.pop())
    return {"save_embedding_layers": bool(vocab_size) and vocab_size != getattr(original, "vocab_size", vocab_size)}


def save_for_hub(
    peft_model,
    save_directory: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model_id: str | None = None,
    tags: list[str] | None = None,
    **save_kwargs,
) -> list[str]:
    """Write into `save_directory` exactly what `push_to_hub(repo_id)` commits; returns the files, relative and sorted.

    The same as `save_pretrained`, with the card's code naming `repo_id` and its metadata carrying `tags`. Use it to
    see what a push will publish, or to upload the folder yourself (`huggingface-cli upload`).
    """
    with publishing(repo_id, tags):
        peft_model.save_pretrained(save_directory, base_model_id=base_model_id, **save_kwargs)
    root = os.fspath(save_directory)
    return sorted(
        os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
        for folder, _dirs, names in os.walk(root)
        for name in names
    )


def push_to_hub(
    peft_model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    base_model_id: str | None = None,
    **save_kwargs,
):
    """`PeftModel.push_to_hub` for CoFiTune adapters: create the repository if needed, then one commit of the folder
    `save_for_hub` writes. A card already in the repository is kept outside the generated block. Returns the
    `CommitInfo` (a `str`, the commit's URL)."""
    save_kwargs.pop("max_shard_size", None)  # transformers' argument; an adapter is never sharded
    api = HfApi(token=token, library_name="cofitune-peft")
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="cofitune-push-") as folder:
        _fetch_card(repo_id, revision, token, folder)
        save_for_hub(peft_model, folder, repo_id=repo_id, base_model_id=base_model_id, tags=tags, **save_kwargs)
        _warn_without_base_id(peft_model, repo_id)
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload CoFiTune adapter",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def _fetch_card(repo_id: str, revision: str | None, token, folder: str) -> None:
    """Copy the repository's README.md (if any) into `folder`, where the card writer merges into it."""
    with tempfile.TemporaryDirectory(prefix="cofitune-card-") as download:
        try:
            path = hf_hub_download(repo_id, "README.md", revision=revision, token=token, local_dir=download)
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            return
        shutil.copyfile(path, os.path.join(folder, "README.md"))


def _warn_without_base_id(peft_model, repo_id: str) -> None:
    for name, cfg in peft_model.peft_config.items():
        if not isinstance(cfg, CoFiTuneConfig) or hub_id_of(cfg.base_model_name_or_path):
            continue
        if (repo_id, name) in _WARNED:
            continue
        _WARNED.add((repo_id, name))
        warnings.warn(
            f"push_to_hub({repo_id!r}): adapter {name!r} does not know its base model's Hub id "
            f"(`base_model_name_or_path` is {cfg.base_model_name_or_path!r}), so its card has no `base_model` and "
            "`AutoPeftModelForCausalLM` cannot find the base elsewhere; pass `base_model_id='owner/name'` to "
            "push_to_hub.",
            UserWarning,
            stacklevel=3,
        )
