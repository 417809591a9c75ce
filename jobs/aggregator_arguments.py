"""The aggregators a workflow can name and their arguments, checked without torch.

A job's parameters are checked where they enter (the portal's submission, a recipe's
constructor), long before any tensor is read; this module checks them there without torch
(the :mod:`jobs.aggregation` package, where the aggregators are, imports torch as it loads).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from common.validators import FieldError, check_finite_number, check_int, shown


def check_trim_fraction(value: Any) -> float:
    """A number with ``0 <= value < 0.5``: the share of updates dropped on each side."""
    fraction = check_finite_number("trim_fraction", value)
    if not 0 <= fraction < 0.5:
        raise FieldError(
            "trim_fraction",
            f"must be at least 0 and below 0.5 to leave an update, got {shown(value)}",
        )
    return fraction


def check_num_malicious(value: Any) -> int:
    return check_int("num_malicious", value, low=0)


def check_num_to_keep(value: Any) -> int:
    return check_int("num_to_keep", value, low=1)


ARGUMENT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "trim_fraction": check_trim_fraction,
    "num_malicious": check_num_malicious,
    "num_to_keep": check_num_to_keep,
}
"""Each aggregator argument's check, for arguments that arrive before the updates do."""

AGGREGATOR_ARGUMENTS: dict[str, dict[str, bool]] = {
    "mean": {},
    "median": {},
    "trimmed_mean": {"trim_fraction": True},
    "krum": {"num_malicious": True, "num_to_keep": False},
}
"""Each aggregator's arguments a user may set, each with whether it is required."""


def check_aggregator_args(name: Any, args: Any) -> dict[str, Any]:
    """``args`` of the aggregator ``name``, checked: a known name, known arguments, the
    required ones present, each value in range. A :class:`FieldError` names what is wrong."""
    if not isinstance(name, str) or name not in AGGREGATOR_ARGUMENTS:
        known = ", ".join(repr(known) for known in sorted(AGGREGATOR_ARGUMENTS))
        raise FieldError("aggregator", f"unknown aggregator {shown(name)}; known: {known}")
    if not isinstance(args, Mapping):
        raise FieldError("aggregator_args", f"must be an object, got {type(args).__name__}")
    takes = AGGREGATOR_ARGUMENTS[name]
    for arg in sorted(args):
        if arg not in takes:
            listed = ", ".join(sorted(takes)) or "none"
            raise FieldError(
                arg, f"not an argument of the {name!r} aggregator (it takes: {listed})"
            )
    for arg, required in takes.items():
        if required and arg not in args:
            raise FieldError(arg, f"required by the {name!r} aggregator")
    return {arg: ARGUMENT_CHECKS[arg](value) for arg, value in args.items()}
