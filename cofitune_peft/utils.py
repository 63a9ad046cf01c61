"""Small helpers shared by the core and the experiment kit: atomic writes, a model's device.

Public, so that `cofitune_peft.kit` (and user code) can use them without reaching into private modules.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["atomic_path", "device_of", "file_mode", "write_json_atomic"]

_FILE_MODE: list[int] = []


def _read_umask() -> int:
    # Linux reports the umask without changing it; elsewhere set-and-restore (a race only with other threads' umask).
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The permissions `open(path, "w")` would give a new file (read once, on first use).

    Files written through `tempfile.mkstemp` start as 0600; adapters and importance files are meant to be shared and
    published, so `atomic_path` gives them these permissions instead.
    """
    if not _FILE_MODE:
        _FILE_MODE.append(0o666 & ~_read_umask())
    return _FILE_MODE[0]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on error it is removed.

    Write the file (or, with `directory=True`, fill the folder) at the yielded path. Readers see either the old
    `path` or the complete new one, never half of one; a failed write leaves the old one untouched.

    Example:

    ```python
    >>> import json, os, tempfile
    >>> from cofitune_peft.utils import atomic_path
    >>> target = os.path.join(tempfile.mkdtemp(), "result.json")
    >>> with atomic_path(target) as tmp:
    ...     with open(tmp, "w") as f:
    ...         json.dump({"ok": True}, f)
    >>> json.load(open(target))
    {'ok': True}
    ```
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(path)
    if directory:
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
        os.close(fd)
    try:
        yield tmp
        if directory:
            old = None
            if os.path.isdir(path):
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                os.replace(path, os.path.join(old, name))
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def _json_default(value: Any):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int | None = 1) -> None:
    """Write `payload` as JSON through `atomic_path` (tensors and numpy scalars become numbers)."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(payload, fh, indent=indent, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
