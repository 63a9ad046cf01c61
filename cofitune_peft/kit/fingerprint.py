"""One stable hash of JSON-able settings, for the kit's caches (search candidates, evaluator identities)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(payload: Any, length: int = 16) -> str:
    """A short sha256 of `payload` as sorted JSON (unknown types by `str`): equal settings, equal fingerprint."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]
