"""What ``flare.log`` carries: NVFlare's analytics data types, checked once where a script
logs, and one reading of a logged record into numeric metric points.

A ``log`` frame (script → runtime) is JSON::

    {"type": "log", "key": str, "data_type": "SCALAR", "value": …, "step": int | None,
     "round": int | None, "writer": "TORCH_TENSORBOARD" | "MLFLOW" | "WEIGHTS_AND_BIASES" | None,
     "kwargs": {str: str | number | bool}}

``value`` by data type: SCALAR and METRIC a number; SCALARS and METRICS an object of numbers;
TEXT a string; PARAMETER and TAG a string, number or bool; PARAMETERS and TAGS an object of
those. :func:`received_frame` checks a frame where it is received and :func:`numeric_points` turns
the numeric types into ``(key, value)`` points (what the
run's metrics and the portal's charts hold); the others are records for experiment trackers
(``jobs.tracking``). SimEnv and the site agent read frames with the same functions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from enum import Enum
from typing import Any

from common.validators import is_int, is_number


class AnalyticsDataType(Enum):
    """NVFlare's ``nvflare.apis.analytix.AnalyticsDataType`` members and values.

    IMAGE, LOG_RECORD, MODEL and INIT_DATA exist so that a script naming them imports, but
    ``flare.log`` refuses them: no tracker here receives images, models or log records.
    """

    SCALARS = "SCALARS"
    SCALAR = "SCALAR"
    IMAGE = "IMAGE"
    TEXT = "TEXT"
    LOG_RECORD = "LOG_RECORD"
    PARAMETER = "PARAMETER"
    PARAMETERS = "PARAMETERS"
    METRIC = "METRIC"
    METRICS = "METRICS"
    MODEL = "MODEL"
    TAG = "TAG"
    TAGS = "TAGS"
    INIT_DATA = "INIT_DATA"


class LogWriterName(Enum):
    """NVFlare's names of the tracking library a record was written for."""

    TORCH_TB = "TORCH_TENSORBOARD"
    MLFLOW = "MLFLOW"
    WANDB = "WEIGHTS_AND_BIASES"


# One number: its key is the point's key.
SINGLE_NUMBER_TYPES = frozenset({"SCALAR", "METRIC"})
# An object of numbers: SCALARS (TensorBoard's add_scalars) keys its points "<key>/<name>",
# TensorBoard's layout; METRICS (MLflow's log_metrics, W&B's log) by the name alone, as those
# libraries do.
NUMBER_MAP_TYPES = frozenset({"SCALARS", "METRICS"})
# Strings and settings for trackers only: not metric points.
RECORD_TYPES = frozenset({"TEXT", "PARAMETER", "PARAMETERS", "TAG", "TAGS"})
SUPPORTED_TYPES = SINGLE_NUMBER_TYPES | NUMBER_MAP_TYPES | RECORD_TYPES

MAX_KEY_LENGTH = 200  # the portal's MetricPoint.key
MAX_TEXT_LENGTH = 65_536
MAX_MAP_ENTRIES = 1_000
MAX_KWARGS = 20


class LogRecordError(TypeError):
    """A ``flare.log`` call whose arguments cannot be logged; the message names the one."""


def data_type_name(data_type: Any) -> str:
    """``"SCALAR"`` for ``AnalyticsDataType.SCALAR``, NVFlare's enum member, or the string."""
    raw = getattr(data_type, "value", data_type)
    if not isinstance(raw, str) or raw.upper() not in AnalyticsDataType.__members__:
        raise LogRecordError(
            f"data_type must be an AnalyticsDataType ({', '.join(sorted(SUPPORTED_TYPES))}), "
            f"got {data_type!r}"
        )
    name = raw.upper()
    if name not in SUPPORTED_TYPES:
        raise LogRecordError(
            f"data_type {name} is not supported here: log numbers (SCALAR, SCALARS, METRIC, "
            "METRICS), TEXT, PARAMETER(S) or TAG(S)"
        )
    return name


def _number(where: str, value: Any) -> float:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()  # a 0-d tensor or numpy scalar
    if not is_number(value):
        raise LogRecordError(f"{where} must be a number, got {type(value).__name__}")
    return float(value)


def _setting(where: str, value: Any) -> str | float | bool:
    """A PARAMETER or TAG value: kept as the string, number or bool it is."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool | str):
        if isinstance(value, str) and len(value) > MAX_TEXT_LENGTH:
            raise LogRecordError(f"{where} is longer than {MAX_TEXT_LENGTH} characters")
        return value
    if isinstance(value, numbers.Integral) and abs(int(value)) < 2**53:
        return int(value)  # log_param("epochs", 5) stays 5, not 5.0
    if is_number(value):
        return float(value)
    raise LogRecordError(f"{where} must be a string, number or bool, got {type(value).__name__}")


def _mapping(where: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not value:
        raise LogRecordError(f"{where} must be a non-empty dict of names, got {value!r:.80}")
    if len(value) > MAX_MAP_ENTRIES:
        raise LogRecordError(f"{where} holds {len(value)} entries, more than {MAX_MAP_ENTRIES}")
    for name in value:
        if not isinstance(name, str) or not name or len(name) > MAX_KEY_LENGTH:
            raise LogRecordError(f"{where}: every name must be a string of 1 to {MAX_KEY_LENGTH}")
    return value


def checked_value(key: str, data_type: str, value: Any) -> Any:
    """``value`` as JSON for ``data_type``, or :class:`LogRecordError` naming what is wrong."""
    where = f"flare.log({key!r}, …, data_type={data_type}): value"
    if data_type in SINGLE_NUMBER_TYPES:
        return _number(where, value)
    if data_type in NUMBER_MAP_TYPES:
        return {
            name: _number(f"{where}[{name!r}]", v) for name, v in _mapping(where, value).items()
        }
    if data_type == "TEXT":
        if not isinstance(value, str):
            raise LogRecordError(f"{where} must be a string, got {type(value).__name__}")
        if len(value) > MAX_TEXT_LENGTH:
            raise LogRecordError(f"{where} is longer than {MAX_TEXT_LENGTH} characters")
        return value
    if data_type in ("PARAMETER", "TAG"):
        return _setting(where, value)
    return {name: _setting(f"{where}[{name!r}]", v) for name, v in _mapping(where, value).items()}


def checked_kwargs(key: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The extra keyword arguments a tracker may use (``path`` of a TEXT artifact, …): strings,
    numbers and bools only; enum members (``writer=LogWriterName.MLFLOW``) by their value."""
    if len(kwargs) > MAX_KWARGS:
        raise LogRecordError(f"flare.log({key!r}, …): more than {MAX_KWARGS} keyword arguments")
    out: dict[str, Any] = {}
    for name, value in kwargs.items():
        value = getattr(value, "value", value)
        if value is None:
            continue
        if (
            isinstance(value, str)
            and len(value) <= MAX_KEY_LENGTH * 5
            or isinstance(value, bool)
            or (is_number(value) and math.isfinite(float(value)))
        ):
            out[name] = value
        else:
            raise LogRecordError(
                f"flare.log({key!r}, …): keyword {name}= must be a short string, a number or "
                f"a bool, got {type(value).__name__}"
            )
    return out


def log_frame(
    key: Any,
    value: Any,
    data_type: Any,
    *,
    step: Any,
    current_round: int | None,
    writer: Any = None,
    kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``log`` frame for one ``flare.log`` call, every argument checked."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise LogRecordError(
            f"flare.log(): key must be a string of 1 to {MAX_KEY_LENGTH} characters, got {key!r}"
        )
    type_name = data_type_name(data_type)
    if hasattr(step, "item") and getattr(step, "ndim", 0) == 0:
        step = step.item()
    if step is not None and not is_int(step):
        raise LogRecordError(
            f"flare.log({key!r}, …): global_step must be an int, got {type(step).__name__}"
        )
    writer_name = getattr(writer, "value", writer)
    if writer_name is not None and writer_name not in {w.value for w in LogWriterName}:
        raise LogRecordError(
            f"flare.log({key!r}, …): writer must be a LogWriterName, got {writer!r}"
        )
    return {
        "type": "log",
        "key": key,
        "data_type": type_name,
        "value": checked_value(key, type_name, value),
        "step": None if step is None else int(step),
        "round": current_round,
        "writer": writer_name,
        "kwargs": checked_kwargs(key, kwargs or {}),
    }


def received_frame(frame: Mapping[str, Any]) -> dict[str, Any]:
    """A ``log`` frame as the receiving end keeps it, checked again (the runtime does not
    trust the script's process; :class:`LogRecordError` names what is wrong): ``data_type``
    and ``value`` in their checked form (a frame without ``data_type`` is a SCALAR, what
    scripts of earlier versions sent), ``step`` and ``round`` ints or None, and its numeric
    points in ``points``. What reads the
    frame afterwards (the run's metrics, the trackers) need not check it again."""
    key = frame.get("key")
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise LogRecordError(f"a log record's key must be a string of 1 to {MAX_KEY_LENGTH}")
    data_type = data_type_name(frame.get("data_type") or "SCALAR")
    value = checked_value(key, data_type, frame.get("value"))
    for name in ("step", "round"):
        number = frame.get(name)
        if number is not None and not is_int(number):
            raise LogRecordError(f"log record {key!r}: {name} must be an int, got {number!r}")
    checked = {**frame, "data_type": data_type, "value": value}
    checked["points"] = numeric_points(checked)
    return checked


def numeric_points(frame: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The ``(key, value)`` metric points of a checked ``log`` frame; none for TEXT and
    settings."""
    key, data_type, value = frame["key"], frame["data_type"], frame["value"]
    if data_type in SINGLE_NUMBER_TYPES:
        return [(key, float(value))]
    if data_type == "SCALARS":
        return [(f"{key}/{name}", float(v)) for name, v in value.items()]
    if data_type == "METRICS":
        return [(str(name), float(v)) for name, v in value.items()]
    return []
