"""The bounds on every number a site sends, and the small named checks that apply them.

A federation's sites are run by other organisations, so nothing a site reports is trusted: an
update's weight and metrics, a ``flare.log`` point's value, step and round, a reported round
number. Each is checked here, where it enters (the update check, the metrics and log-line
services, the agent's socket), so that what is stored always fits the database and what is
aggregated cannot overflow. The checks raise :class:`NumberRejected` naming the field and the
reason; callers turn it into their own error (an update rejected for the site and round, or a
4xx naming the field).

Pure: no Django, no torch; the portal, its workers and ``SimEnv`` share it.

Bounds chosen, and why:

- an update's weight (``NUM_STEPS_CURRENT_ROUND``) is a count: a positive finite number up to
  2**53, the largest integer a float64 still counts exactly. The sum of a million sites'
  weights stays finite, so FedAvg's normalisation cannot overflow;
- a metric value is any finite float64 (a diverged model's perplexity may be 1e40; that is
  still a number to show). Aggregates are convex combinations with normalised weights, which
  cannot exceed the largest value folded in;
- an update carries at most :data:`MAX_RESULT_METRICS` metrics, named by strings of at most
  :data:`MAX_METRIC_KEY_LENGTH` characters, each value a number (``bool`` is not one);
- a step is a signed 64-bit integer (the database column), a round number a non-negative
  32-bit one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from common import validators
from common.validators import FieldError, is_number, shown

MAX_UPDATE_WEIGHT = float(2**53)
MAX_RESULT_METRICS = 1000
MAX_METRIC_KEY_LENGTH = 200
STEP_MIN, STEP_MAX = -(2**63), 2**63 - 1
ROUND_MAX = 2**31 - 1


class NumberRejected(FieldError):
    """A number a site sent is out of bounds; ``field`` names it, ``reason`` says why."""


def check_finite_number(field: str, value: Any) -> float:
    """``value`` as a float, if it is a finite real number (not a bool)."""
    return validators.check_finite_number(field, value, error=NumberRejected)


def check_int_range(field: str, value: Any, *, low: int, high: int) -> int:
    """``value`` if it is an integer (not a bool) with ``low <= value <= high``."""
    return validators.check_int(field, value, low=low, high=high, error=NumberRejected)


def check_optional_step(field: str, value: Any) -> int | None:
    return None if value is None else check_int_range(field, value, low=STEP_MIN, high=STEP_MAX)


def check_optional_round(field: str, value: Any) -> int | None:
    return None if value is None else check_int_range(field, value, low=0, high=ROUND_MAX)


def check_update_weight(value: Any, *, field: str = "NUM_STEPS_CURRENT_ROUND") -> float:
    """An update's FedAvg weight: a positive finite number up to :data:`MAX_UPDATE_WEIGHT`."""
    if not is_number(value):
        raise NumberRejected(field, f"must be a number, got {shown(value)}")
    try:
        weight = float(value)
    except OverflowError:  # an int beyond float64: too large, like any other past the bound
        weight = math.inf
    if not (math.isfinite(weight) and 0 < weight <= MAX_UPDATE_WEIGHT):
        raise NumberRejected(
            field, f"must be a positive number of at most 2**53, got {shown(value)}"
        )
    return weight


def check_result_metrics(metrics: Any, *, field: str = "metrics") -> dict[str, float]:
    """A result's metrics as ``{name: float}``: a flat mapping of names to finite numbers."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise NumberRejected(
            field, f"must be an object of metric names to numbers, got {shown(metrics)}"
        )
    if len(metrics) > MAX_RESULT_METRICS:
        raise NumberRejected(
            field, f"holds {len(metrics)} metrics; at most {MAX_RESULT_METRICS} are taken"
        )
    checked: dict[str, float] = {}
    for key, value in metrics.items():
        problem = metric_name_problem(key)
        if problem:
            raise NumberRejected(field, problem)
        checked[key] = check_finite_number(f"{field}[{key!r}]", value)
    return checked


def metric_name_problem(key: Any) -> str:
    """What is wrong with ``key`` as a metric's name ("" when nothing): 1 to
    :data:`MAX_METRIC_KEY_LENGTH` characters of text a database column takes, so no NUL and
    no lone surrogate (JSON and safetensors headers carry both; PostgreSQL refuses them)."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_METRIC_KEY_LENGTH:
        return f"metric names must be 1 to {MAX_METRIC_KEY_LENGTH} characters, got {shown(key)}"
    if "\x00" in key or not key.isascii() and _has_lone_surrogate(key):
        return f"metric names cannot hold a NUL character or a lone surrogate, got {key!r}"
    return ""


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
