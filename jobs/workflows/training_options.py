"""NVFlare's FedAvg-family options, as pure functions the training workflows share:
early stopping (``stop_cond`` and ``patience``), ``exclude_vars`` and ``aggregation_weights``.

- **Early stopping** follows NVFlare's FedAvg controller (``nvflare/app_common/workflows/
  fedavg.py``): after each round, the round's aggregated metrics (which score the model the
  round started from) are compared with the best so far and with the target of
  ``stop_cond`` (``"<metric> <op> <number>"``, op one of ``>= <= > < =``); the job stops after
  a round whose metric meets the target, or after ``patience`` rounds without improvement.
  The count lives in the server state, so a portal worker that restarts resumes it.
- **exclude_vars** is a regular expression (``re.search`` on each tensor name, as NVFlare's
  aggregators): matching tensors never leave a site in a train result (the Client API drops
  them), are not aggregated, and keep their initial values in the global model.
- **aggregation_weights** multiplies each site's FedAvg weight (its
  ``NUM_STEPS_CURRENT_ROUND``, 1.0 when missing), as NVFlare's weighted aggregators do; a site
  not named weighs 1.0.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.validators import FieldError, check_finite_number, is_int
from jobs.workflows.base import MAX_ROUNDS

EARLY_STOP_STATE_KEY = "early_stop"

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "=": operator.eq,
}
# The key metric's mode a stop condition implies (NVFlare's recipe infers it the same way).
_MODE_BY_OPERATOR = {">=": "max", ">": "max", "<=": "min", "<": "min"}


@dataclass(frozen=True)
class StopCondition:
    """``stop_cond`` read: ``"accuracy >= 0.95"`` is ``("accuracy", ">=", 0.95)``."""

    metric: str
    op: str
    target: float

    @classmethod
    def parse(cls, text: Any) -> StopCondition:
        if not isinstance(text, str):
            raise FieldError("stop_cond", f"must be a string like 'accuracy >= 0.95', got {text!r}")
        parts = text.split()
        if len(parts) != 3:
            raise FieldError(
                "stop_cond", f"must be '<metric> <op> <number>', like 'accuracy >= 0.95': {text!r}"
            )
        metric, op, target = parts
        if op not in _OPERATORS:
            raise FieldError(
                "stop_cond", f"operator {op!r} must be one of {', '.join(_OPERATORS)} in {text!r}"
            )
        try:
            value = float(target)
        except ValueError:
            raise FieldError("stop_cond", f"{target!r} is not a number in {text!r}") from None
        return cls(metric, op, check_finite_number("stop_cond", value))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.target:g}"

    def holds(self, value: float, reference: float) -> bool:
        return _OPERATORS[self.op](value, reference)

    @property
    def mode(self) -> str | None:
        """``"max"`` or ``"min"`` when the operator says which way is better."""
        return _MODE_BY_OPERATOR.get(self.op)


def check_stop_options(stop_cond: str | None, patience: int | None) -> StopCondition | None:
    condition = None if stop_cond is None else StopCondition.parse(stop_cond)
    if patience is not None:
        if not is_int(patience):
            raise FieldError("patience", f"must be a whole number of rounds, got {patience!r}")
        if not 1 <= patience <= MAX_ROUNDS:
            raise FieldError("patience", f"must be from 1 to {MAX_ROUNDS}, got {patience}")
        if condition is None:
            # NVFlare ignores patience without stop_cond; a run that silently never stops
            # early is worse than an error here.
            raise FieldError(
                "patience",
                "needs stop_cond: patience counts rounds without improvement of stop_cond's metric",
            )
    return condition


def key_metric_mode_for(
    key_metric: str | None, key_metric_mode: str | None, stop_cond: str | None
) -> str:
    """NVFlare's rule: ``key_metric_mode`` as given; None is the mode ``stop_cond`` implies
    when it names the key metric, else ``"max"``. A mode contrary to ``stop_cond``'s on the
    same metric is refused."""
    condition = None if stop_cond is None else StopCondition.parse(stop_cond)
    implied = condition.mode if condition and condition.metric == key_metric else None
    if key_metric_mode is None:
        return implied or "max"
    if implied and key_metric_mode != implied:
        raise FieldError(
            "key_metric_mode",
            f"{key_metric_mode!r} contradicts stop_cond {stop_cond!r}, which makes "
            f"{key_metric!r} better when {implied}",
        )
    return key_metric_mode


def early_stop_after(
    condition: StopCondition,
    patience: int | None,
    round_number: int,
    metrics: Mapping[str, float],
    previous: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The early-stop record after round ``round_number``: ``best``, ``rounds_without_
    improvement``, and, when the job stops here, ``stopped_after`` and ``reason``."""
    best = (previous or {}).get("best")
    without = int((previous or {}).get("rounds_without_improvement", 0))
    value = metrics.get(condition.metric)
    if value is not None:
        if best is None or condition.holds(value, best):
            if patience and best == value:  # equal is not an improvement when counting
                without += 1
            else:
                best, without = value, 0
        else:
            without += 1
    record: dict[str, Any] = {"best": best, "rounds_without_improvement": without}
    if patience and without >= patience:
        record["reason"] = f"{patience} round(s) without improvement of {condition.metric}"
    elif value is not None and condition.holds(value, condition.target):
        record["reason"] = f"{condition} met ({condition.metric} = {value:.6g})"
    if "reason" in record:
        record["stopped_after"] = round_number
    return record


def rounds_run_when_stopped(state_data: Mapping[str, Any]) -> int | None:
    """How many rounds a stopped training ran (its last round + 1), or None if not stopped."""
    stopped_after = (state_data.get(EARLY_STOP_STATE_KEY) or {}).get("stopped_after")
    return None if stopped_after is None else int(stopped_after) + 1


def stop_reason(before: Mapping[str, Any], after: Mapping[str, Any]) -> str | None:
    """``"stopped early: <why>"`` when the round that turned server state data ``before``
    into ``after`` stopped the training, else None: what drivers tell the user."""
    if rounds_run_when_stopped(after) is None or rounds_run_when_stopped(before) is not None:
        return None
    return f"stopped early: {after[EARLY_STOP_STATE_KEY]['reason']}"


def check_exclude_vars(exclude_vars: Any) -> str | None:
    if exclude_vars is None or exclude_vars == "":
        return None
    if not isinstance(exclude_vars, str):
        raise FieldError("exclude_vars", f"must be a regular expression, got {exclude_vars!r}")
    try:
        re.compile(exclude_vars)
    except re.error as exc:
        raise FieldError(
            "exclude_vars", f"{exclude_vars!r} is not a regular expression: {exc}"
        ) from None
    return exclude_vars


def excluded(pattern: str | None, names: Iterable[str]) -> set[str]:
    """The names ``pattern`` excludes (``re.search``, NVFlare's match)."""
    if not pattern:
        return set()
    compiled = re.compile(pattern)
    return {name for name in names if compiled.search(name)}


def check_aggregation_weights(weights: Any, aggregator: str) -> dict[str, float]:
    if not weights:
        return {}
    if not isinstance(weights, Mapping):
        raise FieldError(
            "aggregation_weights", f"must map site names to weights, got {type(weights).__name__}"
        )
    if aggregator != "mean":
        raise FieldError(
            "aggregation_weights",
            f"weights a mean: the {aggregator!r} aggregator weighs every site the same",
        )
    checked = {}
    for site, weight in weights.items():
        if not isinstance(site, str) or not site:
            raise FieldError("aggregation_weights", f"{site!r} is not a site name")
        value = check_finite_number("aggregation_weights", weight)
        if value < 0:
            raise FieldError("aggregation_weights", f"{site}: must be at least 0, got {weight!r}")
        checked[site] = value
    return checked
