"""File permissions for what the package writes through temp files (`mkstemp` creates them 0600)."""

from __future__ import annotations

import os


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# What `open(path, "w")` would have given: adapters and importance files are meant to be shared and published.
FILE_MODE = _default_file_mode()
