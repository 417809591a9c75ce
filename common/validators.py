"""Small named checks for values that come from outside: a recipe's arguments, a job spec, a
site's report, a form. Standard library only, so the pure core, the agent and the portal share
them.

Python counts ``True`` as the integer 1; no user means it so, hence :func:`is_int` and
:func:`is_number`, which refuse a ``bool``. The ``check_*`` functions take the field's name as
data and raise ``error(field, reason)``: each caller keeps its own error class (a recipe's
``ValueError``, a bundle's ``BundleError``, a site's ``NumberRejected``), and every one of them
is a :class:`FieldError` that carries ``field`` and ``reason`` as attributes, so nobody has to
recover a field name from a message.
"""

from __future__ import annotations

import math
import numbers
import unicodedata
from collections.abc import Callable
from typing import Any, TypeGuard


class FieldError(ValueError):
    """A value that is not acceptable: ``field`` names it, ``reason`` says why.

    ``str()`` is ``"field: reason"``, the form every error of the pure core is shown in.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


# What a check raises: called with the field's name and the reason (a FieldError subclass fits).
ErrorFactory = Callable[[str, str], Exception]


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """A real number (``int``, ``float``, NumPy scalars…) that is not a ``bool``; it may be
    infinite or NaN: :func:`check_finite_number` refuses those too."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def has_control_characters(value: str, *, allowed: str = "") -> bool:
    """Whether ``value`` holds a control character (Unicode category Cc: NUL, escape, a
    newline…) other than those in ``allowed``: names and labels must not, as a terminal or a
    log line would act on them."""
    return any(unicodedata.category(c) == "Cc" and c not in allowed for c in value)


def shown(value: Any) -> str:
    """A value for an error message, cut short: a sender may send a megabyte of digits."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit conversion limit
        return "an integer of thousands of digits"
    return text if len(text) <= 60 else f"{text[:40]}…({len(text)} characters)"


def check_int(
    field: str,
    value: Any,
    *,
    low: int | None = None,
    high: int | None = None,
    error: ErrorFactory = FieldError,
) -> int:
    """``value`` if it is an integer (not a bool) with ``low <= value <= high`` (either bound
    may be left out)."""
    if not is_int(value):
        raise error(field, f"must be an integer, got {shown(value)}")
    if low is not None and high is not None:
        if not low <= value <= high:
            raise error(field, f"must be between {low} and {high}, got {shown(value)}")
    elif low is not None and value < low:
        raise error(field, f"must be at least {low}, got {shown(value)}")
    elif high is not None and value > high:
        raise error(field, f"must be at most {high}, got {shown(value)}")
    return value


def check_finite_number(field: str, value: Any, *, error: ErrorFactory = FieldError) -> float:
    """``value`` as a float, if it is a finite real number (not a bool)."""
    if not is_number(value):
        raise error(field, f"must be a number, got {shown(value)}")
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond float64
        raise error(field, f"must be a finite number, got {shown(value)}") from None
    if not math.isfinite(as_float):
        raise error(field, f"must be a finite number, got {as_float!r}")
    return as_float
