"""Experiment tracking with NVFlare's names: ``SummaryWriter`` (TensorBoard's calls),
``MLflowWriter`` (MLflow's) and ``WandBWriter`` (Weights & Biases'), all over ``flare.log``.

An NVFlare script's ``from nvflare.client.tracking import SummaryWriter`` becomes
``from client_agent.tracking import SummaryWriter``. Each call sends one ``log`` record with
NVFlare's data type, the writer's :class:`LogWriterName` and ``global_step``, exactly as
NVFlare's writers do: the numbers reach the run's metrics and the portal's charts (tagged with
the round), and every record reaches the job's experiment trackers
(``jobs.recipes.add_experiment_tracking``), which write TensorBoard event files or MLflow runs.
Nothing is written at the site by the writers themselves: that is the receivers' work.

Call the writers after ``flare.init()``: they use the process's one Client API connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from client_agent import api
from client_agent.analytics import AnalyticsDataType, LogWriterName

__all__ = [
    "AnalyticsDataType",
    "LogWriterName",
    "MLflowWriter",
    "SummaryWriter",
    "WandBWriter",
    "log",
]


def log(key: str, value: Any, data_type: AnalyticsDataType, ctx: Any = None, **kwargs: Any) -> None:
    """NVFlare's ``tracking.log``: ``flare.log`` with the data type spelled out."""
    _check_context(ctx)
    api.log(key, value, data_type, **kwargs)


def _check_context(ctx: Any) -> None:
    # NVFlare's writers take the APIContext that its init() returns; this Client API has one
    # connection per process, and its init() returns None, so None is the only context there is.
    if ctx is not None:
        raise TypeError(
            "ctx: this Client API has one connection per process; create the writer without "
            f"a context (got {type(ctx).__name__})"
        )


def _as_setting(value: Any) -> Any:
    """A parameter or tag value as MLflow takes it: strings, numbers and bools as they are,
    anything else string-ified (MLflow's ``log_param`` and ``set_tag`` do the same)."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    if isinstance(value, str | bool | int | float):
        return value
    return str(value)


class _BaseWriter:
    def __init__(self, ctx: Any = None) -> None:
        _check_context(ctx)


class SummaryWriter(_BaseWriter):
    """TensorBoard's ``SummaryWriter`` calls that NVFlare's tracking module offers.

    Pass ``global_step`` for a time series: without it the receivers write the record at the
    round's number.
    """

    def add_scalar(
        self, tag: str, scalar: float, global_step: int | None = None, **kwargs: Any
    ) -> None:
        """One scalar ``tag`` (data type SCALAR)."""
        api.log(
            tag,
            scalar,
            AnalyticsDataType.SCALAR,
            global_step=global_step,
            writer=LogWriterName.TORCH_TB,
            **kwargs,
        )

    def add_scalars(
        self,
        tag: str,
        scalars: Mapping[str, float],
        global_step: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Several scalars under the parent ``tag`` (data type SCALARS): TensorBoard draws them
        in one chart; the run's metrics hold each as ``<tag>/<name>``."""
        api.log(
            tag,
            scalars,
            AnalyticsDataType.SCALARS,
            global_step=global_step,
            writer=LogWriterName.TORCH_TB,
            **kwargs,
        )

    def flush(self) -> None:
        """Records are sent as they are written: nothing waits here (the receiver flushes)."""

    def close(self) -> None:
        """Nothing is held here: the receiver owns the event files."""


class WandBWriter(_BaseWriter):
    """The ``wandb.log`` call that NVFlare's tracking module offers."""

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Several metrics at ``step`` (data type METRICS, key ``"metrics"`` as NVFlare's)."""
        api.log(
            "metrics",
            metrics,
            AnalyticsDataType.METRICS,
            global_step=step,
            writer=LogWriterName.WANDB,
        )


class MLflowWriter(_BaseWriter):
    """MLflow's logging calls that NVFlare's tracking module offers, for the site's run."""

    def log_param(self, key: str, value: Any) -> None:
        """One parameter (data type PARAMETER)."""
        api.log(key, _as_setting(value), AnalyticsDataType.PARAMETER, writer=LogWriterName.MLFLOW)

    def log_params(self, values: Mapping[str, Any]) -> None:
        """Several parameters (data type PARAMETERS, key ``"params"``)."""
        api.log(
            "params",
            _settings("log_params", "values", values),
            AnalyticsDataType.PARAMETERS,
            writer=LogWriterName.MLFLOW,
        )

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        """One metric at ``step`` (data type METRIC)."""
        api.log(
            key,
            value,
            AnalyticsDataType.METRIC,
            global_step=step,
            writer=LogWriterName.MLFLOW,
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Several metrics at ``step`` (data type METRICS, key ``"metrics"``)."""
        api.log(
            "metrics",
            metrics,
            AnalyticsDataType.METRICS,
            global_step=step,
            writer=LogWriterName.MLFLOW,
        )

    def log_text(self, text: str, artifact_file_path: str) -> None:
        """``text`` saved as the run's artifact ``artifact_file_path`` (data type TEXT, key
        ``"text"``, the path in the record's ``path``)."""
        api.log(
            "text",
            text,
            AnalyticsDataType.TEXT,
            path=artifact_file_path,
            writer=LogWriterName.MLFLOW,
        )

    def set_tag(self, key: str, tag: Any) -> None:
        """One tag of the run (data type TAG)."""
        api.log(key, _as_setting(tag), AnalyticsDataType.TAG, writer=LogWriterName.MLFLOW)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Several tags (data type TAGS, key ``"tags"``)."""
        api.log(
            "tags",
            _settings("set_tags", "tags", tags),
            AnalyticsDataType.TAGS,
            writer=LogWriterName.MLFLOW,
        )


def _settings(call: str, argument: str, values: Any) -> dict[str, Any]:
    if not isinstance(values, Mapping):
        raise TypeError(
            f"MLflowWriter.{call}(): {argument} must be a dict of names, got "
            f"{type(values).__name__}"
        )
    return {name: _as_setting(value) for name, value in values.items()}
