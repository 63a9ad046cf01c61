"""The one exception type of cofitune-peft."""

from __future__ import annotations


class CoFiTuneError(ValueError):
    """Raised for every invalid input to cofitune-peft.

    The message names the parameter (in backticks), what was received, what is allowed and how to fix it. It subclasses
    `ValueError`, so code that already catches `ValueError` around PEFT calls keeps working.
    """
