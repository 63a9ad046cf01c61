"""Load a script under `benchmarks/` as a module, for the tests of the benchmark scripts."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@contextlib.contextmanager
def benchmark_script(relative_path: str) -> Iterator[ModuleType]:
    """The script `benchmarks/<relative_path>`, executed as a module named after its file and registered in
    `sys.modules` while the context lasts (dataclasses look their module up); its folder is on `sys.path` while it
    executes (scripts import their sibling `_common`)."""
    path = os.path.join(BENCHMARKS, relative_path)
    name = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.dirname(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    try:
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(folder)
        yield module
    finally:
        sys.modules.pop(name, None)
