"""Cached state that cannot run code: nested dicts and lists of JSON values and tensors, in one safetensors file.

The comparison (`cofitune compare`) and the coarse search keep the base model's versatility reference next to their
results, and reload it when a run resumes. A results folder can come from someone else, so reading it must not run
code: `torch.load(..., weights_only=False)` would execute whatever a pickle holds. `save_state` writes the tensors as
safetensors and the structure around them as JSON in the file's header; `load_state` reads only that (no pickle, no
`eval`), and refuses any other file by name, with the advice to delete it so that it is recomputed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from cofitune_peft import CoFiTuneError
from cofitune_peft.utils import atomic_path

__all__ = ["FORMAT", "legacy_pickle_error", "load_state", "save_state"]

FORMAT = "cofitune-state"
FORMAT_VERSION = "1"
_TENSOR = "__tensor__"


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """`value` as JSON, each tensor replaced by `{"__tensor__": name}` and stored in `tensors`."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: name}
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise CoFiTuneError(f"`state`{where}: dict keys must be strings, got {sorted(map(repr, value))[:4]}.")
        if _TENSOR in value:
            raise CoFiTuneError(f"`state`{where}: the key {_TENSOR!r} is reserved for tensors; rename it.")
        return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    raise CoFiTuneError(
        f"`state`{where}: a {type(value).__name__} cannot be stored; a state holds dicts with string keys, lists, "
        "tensors, strings, numbers, booleans and None."
    )


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            name = value[_TENSOR]
            if name not in tensors:
                raise CoFiTuneError(_unreadable(path, f"it names a tensor {name!r} it does not hold"))
            return tensors[name]
        if set(value) == {"__float__"} and value["__float__"] in ("nan", "inf", "-inf"):
            return float(value["__float__"])
        return {k: _decode(v, tensors, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, path) for v in value]
    return value


def _unreadable(path: str, why: str) -> str:
    return (
        f"{path!r} is not a cached state that cofitune-peft can read ({why}); delete it (`rm {path}`) and it is "
        "recomputed on the next run."
    )


def save_state(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write `state` (dicts with string keys, lists, tensors, strings, numbers, booleans, None) to `path` atomically.

    Tensors go into a safetensors file (copied to the CPU); the structure around them into its header as JSON. Tuples
    come back as lists.

    Args:
        state (`Mapping[str, Any]`): the state, e.g. `VersatilityEval.reference_state()`.
        path (`str | os.PathLike`): the file to write (conventionally `*.safetensors`); replaced in one rename.

    Raises:
        `CoFiTuneError`: a value of another type (named with its place in `state`).
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(dict(state), tensors, "")
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "state": json.dumps(structure, allow_nan=False)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state written by `save_state`; nothing in the file is executed.

    Args:
        path (`str | os.PathLike`): a file written by `save_state`.

    Returns:
        `dict[str, Any]`: the state, tensors on the CPU.

    Raises:
        `CoFiTuneError`: the file is not a safetensors file written by `save_state` (a pickle, a corrupt or foreign
            file): the message names it and says to delete it so that it is recomputed.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as err:  # safetensors raises several types for files that are not its own
        raise CoFiTuneError(_unreadable(path, f"not a safetensors file: {err}")) from err
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CoFiTuneError(
            _unreadable(path, f"format {meta.get('format')!r} version {meta.get('version')!r}, not {FORMAT!r} v1")
        )
    try:
        structure = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CoFiTuneError(_unreadable(path, f"its JSON structure is missing or broken: {err}")) from err
    if not isinstance(structure, dict):
        raise CoFiTuneError(_unreadable(path, f"its structure is a {type(structure).__name__}, not a dict"))
    return _decode(structure, tensors, path)


def legacy_pickle_error(path: str | os.PathLike, what: str) -> CoFiTuneError:
    """The error for a cache file that an older version wrote with `torch.save` (a pickle, which is never loaded)."""
    path = os.fspath(path)
    return CoFiTuneError(
        f"{path!r} holds the {what} as a pickle (`torch.save`, as earlier versions of cofitune-peft wrote it). Loading a "
        "pickle can run arbitrary code, so it is not read. Delete it "
        f"(`rm {path}`): the {what} is recomputed from the base model on the next run and stored as safetensors."
    )
