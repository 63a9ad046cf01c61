"""Import paths of cofitune-peft 0.1.0 that moved in 0.2.0 keep working, with a warning that names the new path.

0.2.0 split the package into the method core and the experiment kit (`cofitune_peft.kit`). A meta-path finder maps
each old module name to its new module, imported only when the old name is used, so `import cofitune_peft` still loads
no part of the kit.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "cofitune_peft.cli": "cofitune_peft.kit.cli",
    "cofitune_peft.data": "cofitune_peft.kit.data",
    "cofitune_peft.demo": "cofitune_peft.kit.demo",
    "cofitune_peft.estimation.commands": "cofitune_peft.kit.importance_command",
    "cofitune_peft.evaluation": "cofitune_peft.kit.evaluation",
    "cofitune_peft.masking": "cofitune_peft.importance",
    "cofitune_peft.models": "cofitune_peft.kit.loading",
    "cofitune_peft.search": "cofitune_peft.kit.search",
    "cofitune_peft.training": "cofitune_peft.kit.training",
    "cofitune_peft._peft_compat": "cofitune_peft._compat",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def create_module(self, spec):
        warnings.warn(
            f"`{self.old}` moved to `{self.new}` in cofitune-peft 0.2.0; import it from there.",
            FutureWarning,
            stacklevel=3,
        )
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        sys.modules[self.old] = module


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the 0.1.0 names of moved modules and hands out the new modules."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(fullname, new))


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
