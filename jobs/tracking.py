"""Experiment tracking receivers: what sites log (``flare.log`` and the writers of
``client_agent.tracking``) written to TensorBoard event files or MLflow runs.

A job's spec lists its trackers (``add_experiment_tracking``; checked by
``jobs.bundle.check_experiment_tracking``). :func:`open_tracking` turns them into one
:class:`Tracking` that SimEnv feeds with every site's checked ``log`` frames and each round's
aggregated metrics. The portal writes a finished job's stored points with the same code
(:func:`write_tensorboard`, :func:`write_mlflow`).

**Where.** Server side (``server_side=True``) receives every site's records, as NVFlare's
server receivers do:

- TensorBoard: ``<workspace>/server/<tb_folder>/<site>/`` (``tb_folder`` defaults to
  ``tb_events``), one folder per site, and the rounds' aggregates in ``…/aggregate/``;
- MLflow: ``tracking_config["tracking_uri"]`` or, by default, a file store at
  ``<workspace>/server/mlruns``; one experiment (``experiment_name``, else the job's name) with
  one run per site and one for the aggregates (``aggregate``), each tagged ``site``,
  ``job_id``, ``job_name`` and ``run_name`` over the configured ``run_tags``.

Client side (``client_side=True``; only the ``clients`` named, else every site) keeps each
site's own records with it: ``<workspace>/sites/<site>/<tb_folder>/`` or a file store at
``<workspace>/sites/<site>/mlruns`` (one run, the site's). Aggregates are the server's.

**What.** By data type (NVFlare's ``AnalyticsDataType``):

============  ==================================================  ===========================
data type     TensorBoard                                         MLflow
============  ==================================================  ===========================
SCALAR,       a scalar ``key``                                    a metric ``key``
METRIC
SCALARS       ``add_scalars``' layout: the scalar ``key`` in a    a metric ``<key>/<name>``
              sub-folder ``<key>_<name>`` per name (one chart)    per name (the run's metrics'
                                                                  names)
METRICS       a scalar per name                                   a metric per name
TEXT          text ``key``                                        the artifact ``path`` (the
                                                                  record's ``path=``, else
                                                                  ``<key>.txt``)
PARAMETER(S)  a scalar per numeric or bool value, text per        a param per name
              string (NVFlare's TensorBoard receiver's rule)
TAG(S)        not written: TensorBoard has no tags                a run tag per name
============  ==================================================  ===========================

A record's step is its ``global_step``; a record without one is written at its round's number
(0 before the first round), so a script that logs once a round draws a curve by round. The
aggregates are written at their round's number.

A record a tracker cannot take (an MLflow parameter logged again with another value, a name
MLflow refuses, an artifact path outside the run) is skipped and noted in
:attr:`Tracking.problems` and the log; it never fails the job: training does not stop for its
charts.

MLflow's usage telemetry is turned off (``MLFLOW_DISABLE_TELEMETRY``, unless set already)
before MLflow is first imported here: records go only to the tracking URI the job names.

MLflow's file store is in maintenance mode and refuses to open unless
``MLFLOW_ALLOW_FILE_STORE`` is true; opening one here sets it for this process (unless it is
set already), as a local file store is the documented default.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import posixpath
import re
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from common.validators import FieldError, is_number
from jobs.bundle import TRACKING_TYPES

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from tensorboard.summary.writer.event_file_writer import EventFileWriter  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

AGGREGATE_RUN = "aggregate"
DEFAULT_TB_FOLDER = "tb_events"
DEFAULT_MLFLOW_FOLDER = "mlruns"
DEFAULT_BUFFER_FLUSH_TIME = 1.0  # seconds, NVFlare's MLflowReceiver's default
MAX_PROBLEMS = 100
MLFLOW_BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics
MAX_NAME = 250  # MLflow's bound on metric, param and tag keys
MAX_TAG_VALUE = 5000
# The tags every run carries to say whose it is: a site's script may not overwrite them.
IDENTITY_TAGS = frozenset({"site", "job_id", "job_name", "run_name"})

TB_CONFIG_KEYS = frozenset({"tb_folder"})
MLFLOW_NAME_KEYS = frozenset({"experiment_name", "run_name", "experiment_tags", "run_tags"})
MLFLOW_CONFIG_KEYS = frozenset(
    {"tracking_uri", "kw_args", "artifact_location", "buffer_flush_time"} | MLFLOW_NAME_KEYS
)


class TrackingConfigError(ValueError):
    """A tracker's configuration that cannot be used; the message names the field."""


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorBoardConfig:
    tb_folder: str = DEFAULT_TB_FOLDER


@dataclass(frozen=True)
class MlflowConfig:
    """NVFlare's ``MLflowReceiver`` arguments: ``tracking_uri``, ``kw_args`` (its
    ``experiment_name``, ``run_name``, ``experiment_tags`` and ``run_tags``; given at the top
    level of ``tracking_config`` they mean the same), ``artifact_location`` and
    ``buffer_flush_time``."""

    tracking_uri: str | None = None
    experiment_name: str | None = None
    run_name: str | None = None
    experiment_tags: Mapping[str, str] = field(default_factory=dict)
    run_tags: Mapping[str, str] = field(default_factory=dict)
    artifact_location: str | None = None
    buffer_flush_time: float = DEFAULT_BUFFER_FLUSH_TIME


def _relative_folder(where: str, value: Any) -> str:
    """A folder name inside the workspace: relative, no ``..``, no backslash."""
    if not isinstance(value, str) or not value or len(value) > 200:
        raise TrackingConfigError(f"{where} must be a folder name of 1 to 200 characters")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "\\" in value:
        raise TrackingConfigError(f"{where} must be a relative folder inside the workspace")
    return value


def _name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
        raise TrackingConfigError(f"{where} must be a non-empty string of at most {MAX_NAME}")
    return value


def _tags(where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise TrackingConfigError(f"{where} must be a dict of tag names to values")
    tags = {}
    for name, tag in value.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise TrackingConfigError(f"{where}: {name!r} is not a tag name")
        if not isinstance(tag, str | int | float | bool) or len(str(tag)) > MAX_TAG_VALUE:
            raise TrackingConfigError(f"{where}[{name!r}] must be a string, number or bool")
        tags[name] = str(tag)
    return tags


def check_tracking_config(
    tracking_type: Any, config: Mapping[str, Any] | None, where: str = "tracking_config"
) -> TensorBoardConfig | MlflowConfig:
    """``config`` for a ``tracking_type`` tracker, checked; :class:`TrackingConfigError` (a
    ValueError) names the field at fault. W&B is refused unless its package can run here."""
    if tracking_type not in TRACKING_TYPES:
        raise TrackingConfigError(
            f"tracking_type must be one of {list(TRACKING_TYPES)}, got {tracking_type!r}"
        )
    config = dict(config or {})
    if tracking_type == "wandb":
        raise TrackingConfigError(wandb_unavailable())
    known = TB_CONFIG_KEYS if tracking_type == "tensorboard" else MLFLOW_CONFIG_KEYS
    unknown = sorted(set(config) - known)
    if unknown:
        raise TrackingConfigError(
            f"{where}: unknown keys {unknown} for {tracking_type} (known: {sorted(known)})"
        )
    if tracking_type == "tensorboard":
        return TensorBoardConfig(
            tb_folder=_relative_folder(
                f"{where}['tb_folder']", config.get("tb_folder", DEFAULT_TB_FOLDER)
            )
        )
    kw_args = config.get("kw_args") or {}
    if not isinstance(kw_args, Mapping):
        raise TrackingConfigError(f"{where}['kw_args'] must be a dict")
    unknown = sorted(set(kw_args) - MLFLOW_NAME_KEYS)
    if unknown:
        raise TrackingConfigError(
            f"{where}['kw_args']: unknown keys {unknown} (known: {sorted(MLFLOW_NAME_KEYS)})"
        )
    names: dict[str, Any] = {}
    for key in MLFLOW_NAME_KEYS:
        if key in config and key in kw_args and config[key] != kw_args[key]:
            raise TrackingConfigError(
                f"{where}: {key} is given twice, at the top level and in kw_args, differently"
            )
        if key in kw_args:
            names[key] = kw_args[key]
        elif key in config:
            names[key] = config[key]
    uri = config.get("tracking_uri")
    if uri is not None and (not isinstance(uri, str) or not uri.strip()):
        raise TrackingConfigError(f"{where}['tracking_uri'] must be a non-empty string or None")
    artifact_location = config.get("artifact_location")
    if artifact_location is not None:
        artifact_location = _relative_folder(f"{where}['artifact_location']", artifact_location)
    flush_time = config.get("buffer_flush_time", DEFAULT_BUFFER_FLUSH_TIME)
    if not is_number(flush_time) or not 0 <= flush_time <= 3600:
        raise TrackingConfigError(f"{where}['buffer_flush_time'] must be 0 to 3600 seconds")
    return MlflowConfig(
        tracking_uri=uri,
        experiment_name=(
            None
            if names.get("experiment_name") is None
            else _name(f"{where}: experiment_name", names["experiment_name"])
        ),
        run_name=(
            None
            if names.get("run_name") is None
            else _name(f"{where}: run_name", names["run_name"])
        ),
        experiment_tags=_tags(f"{where}: experiment_tags", names.get("experiment_tags") or {}),
        run_tags=_tags(f"{where}: run_tags", names.get("run_tags") or {}),
        artifact_location=artifact_location,
        buffer_flush_time=float(flush_time),
    )


def wandb_unavailable() -> str:
    """Why a W&B tracker cannot be used here."""
    if importlib.util.find_spec("wandb") is None:
        return (
            "tracking_type 'wandb': W&B's receiver needs the wandb package (pip install wandb) "
            "and runs offline (mode='offline') in the workspace; wandb is not installed. "
            "WandBWriter's records reach a 'tensorboard' or 'mlflow' tracker as they are."
        )
    return (
        "tracking_type 'wandb': this version has no W&B receiver (it would write offline runs); "
        "use 'tensorboard' or 'mlflow': WandBWriter's records reach them as they are."
    )


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One checked tracking record: NVFlare's data type name, key, value, and its step."""

    data_type: str
    key: str
    value: Any
    step: int
    path: str | None = None


def record_of(frame: Mapping[str, Any]) -> Record:
    """The :class:`Record` of a ``log`` frame the runtime has checked
    (:func:`client_agent.analytics.received_frame`)."""
    key, data_type, value = frame["key"], frame["data_type"], frame["value"]
    step = frame.get("step")
    if step is None:
        step = frame.get("round")
    if step is None:
        step = 0
    kwargs = frame.get("kwargs") or {}
    path = kwargs.get("path") if isinstance(kwargs, Mapping) else None
    return Record(
        data_type=data_type,
        key=key,
        value=value,
        step=step,
        path=path if isinstance(path, str) else None,
    )


def _folder_part(name: str) -> str:
    """``name`` as one folder name: characters other than letters, digits, ``.``, ``_`` and
    ``-`` become ``_``, and a leading dot is escaped, so no name climbs out or hides."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:MAX_NAME]
    return "_" + safe if not safe or safe.startswith(".") else safe


def aggregate_run_name(sites: Iterable[str]) -> str:
    """The aggregates' run: ``aggregate``, or ``_aggregate`` (never a site name) should a site
    be called ``aggregate``."""
    return "_" + AGGREGATE_RUN if AGGREGATE_RUN in set(sites) else AGGREGATE_RUN


# --- TensorBoard ------------------------------------------------------------------------------


class TensorBoardStore:
    """Event files under ``root``: one folder per run (``""``: ``root`` itself), written with
    the ``tensorboard`` package's own ``EventFileWriter``. Thread-safe."""

    def __init__(self, root: Path) -> None:
        # Imported here: recipes and the portal's other views need not load TensorBoard.
        from tensorboard.compat.proto.event_pb2 import Event  # type: ignore[import-untyped]
        from tensorboard.compat.proto.summary_pb2 import Summary  # type: ignore[import-untyped]
        from tensorboard.plugins.text.summary_v2 import text_pb  # type: ignore[import-untyped]
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event = Event
        self._summary = Summary
        self._text_pb = text_pb
        self._writer_class = EventFileWriter
        self.root = root
        self._writers: dict[Path, EventFileWriter] = {}
        self._lock = threading.Lock()
        self._closed = False
        root.mkdir(parents=True, exist_ok=True)

    def _writer(self, folder: Path) -> EventFileWriter:
        writer = self._writers.get(folder)
        if writer is None:
            folder.mkdir(parents=True, exist_ok=True)
            writer = self._writer_class(str(folder))
            self._writers[folder] = writer
        return writer

    def _folder(self, run: str) -> Path:
        return self.root / _folder_part(run) if run else self.root

    def _add(self, folder: Path, summary: Any, step: int) -> None:
        event = self._event(wall_time=time.time(), step=step, summary=summary)
        self._writer(folder).add_event(event)

    def _scalar(self, folder: Path, tag: str, value: float, step: int) -> None:
        value_pb = self._summary.Value(tag=tag, simple_value=float(value))
        self._add(folder, self._summary(value=[value_pb]), step)

    def _text(self, folder: Path, tag: str, text: str, step: int) -> None:
        self._add(folder, self._text_pb(tag, text), step)

    def write(self, run: str, record: Record) -> None:
        """``record`` into ``run``'s folder, by the module's table."""
        folder = self._folder(run)
        kind, key, value, step = record.data_type, record.key, record.value, record.step
        with self._lock:
            if self._closed:
                return
            if kind in ("SCALAR", "METRIC"):
                self._scalar(folder, key, value, step)
            elif kind == "SCALARS":
                # TensorBoard's add_scalars: each name a run of its own beside the site's,
                # all with the parent tag, so TensorBoard draws them in one chart.
                for name, number in value.items():
                    sub = folder / _folder_part(f"{key.replace('/', '_')}_{name}")
                    self._scalar(sub, key, number, step)
            elif kind == "METRICS":
                for name, number in value.items():
                    self._scalar(folder, name, number, step)
            elif kind == "TEXT":
                self._text(folder, key, value, step)
            elif kind in ("PARAMETER", "PARAMETERS"):
                entries = value.items() if kind == "PARAMETERS" else [(key, value)]
                for name, setting in entries:
                    if isinstance(setting, str):
                        self._text(folder, name, setting, step)
                    else:
                        self._scalar(folder, name, float(setting), step)
            # TAG and TAGS: TensorBoard has no tags; MLflow keeps them.

    def flush(self) -> None:
        with self._lock:
            for writer in self._writers.values():
                writer.flush()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for writer in self._writers.values():
                writer.close()
            self._writers.clear()


# --- MLflow -----------------------------------------------------------------------------------


def _allow_file_store(tracking_uri: str) -> None:
    """Let MLflow open a file store: MLflow 3 refuses unless ``MLFLOW_ALLOW_FILE_STORE`` is
    true, and a local file store is this module's documented default. An operator's own
    setting is kept."""
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


# How long a tracking server may take to accept a connection before the job is refused.
REACH_TIMEOUT_SECONDS = 5.0


def check_reachable(tracking_uri: str) -> None:
    """An http(s) tracking server answers a connection, else ``FieldError`` naming
    ``tracking_config.tracking_uri`` at once: MLflow's client would otherwise retry for
    minutes before the first round."""
    from urllib.parse import urlsplit

    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), REACH_TIMEOUT_SECONDS):
            pass
    except OSError as exc:
        raise FieldError(
            "tracking_config.tracking_uri",
            f"cannot reach the MLflow server at {parts.hostname}:{port} ({exc})",
        ) from None


def file_store_uri(folder: Path) -> str:
    """The MLflow tracking URI of a file store in ``folder``."""
    return folder.resolve().as_uri()


_MLFLOW_NAME = re.compile(r"^[/\w.\- :]+$")


def mlflow_name_problem(name: str) -> str | None:
    """Why MLflow would refuse ``name`` as a metric or param key, or None: MLflow's rule is
    letters, digits, ``_ - . : /`` and spaces, at most 250 characters, naming no other path
    (``a//b``, ``./a``, ``../a``). Checked before a metric is buffered, for one bad name would
    make MLflow refuse its whole batch."""
    if not _MLFLOW_NAME.match(name) or len(name) > MAX_NAME:
        return f"{name!r}: MLflow takes letters, digits, _ - . : / and spaces, up to {MAX_NAME}"
    normal = posixpath.normpath(name)
    if normal != name or normal.startswith(("..", "/")):
        return f"{name!r}: MLflow refuses a name that reads as another path ({normal!r})"
    return None


def _safe_artifact_path(path: str) -> str | None:
    """``path`` if it names a file inside a run's artifacts, else None."""
    pure = PurePosixPath(path)
    if (
        not path
        or len(path) > 500
        or "\\" in path
        or pure.is_absolute()
        or ".." in pure.parts
        or path.endswith("/")
    ):
        return None
    return str(pure)


class MlflowStore:
    """One MLflow experiment, one run per run name (created when first written), through
    ``MlflowClient`` with an explicit tracking URI: nothing of MLflow's process-wide state (the
    default tracking URI, the active run) is used or changed. Thread-safe.

    Metrics are buffered and sent in batches, at most every ``buffer_flush_time`` seconds, at
    each :meth:`flush` and at :meth:`close` (NVFlare's receiver does the same: a remote server
    would otherwise get a request per logged number). Params, tags and text go at once, each
    record on its own, so one that MLflow refuses costs only itself.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment_name: str,
        job_name: str,
        job_id: str,
        run_name: str | None = None,
        experiment_tags: Mapping[str, str] | None = None,
        run_tags: Mapping[str, str] | None = None,
        artifact_location: Path | None = None,
        buffer_flush_time: float = DEFAULT_BUFFER_FLUSH_TIME,
    ) -> None:
        # MLflow reports its own use to its makers unless told not to, and reads that choice
        # when first imported. Metrics go only where the job's config says; an operator's
        # explicit setting is kept.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._metric_class, self._param_class, self._tag_class = Metric, Param, RunTag
        _allow_file_store(tracking_uri)
        check_reachable(tracking_uri)
        self.tracking_uri = tracking_uri
        self.client: MlflowClient = MlflowClient(tracking_uri=tracking_uri)
        self.job_name, self.job_id = job_name, job_id
        self.run_name = run_name or job_name
        self.run_tags = dict(run_tags or {})
        self.buffer_flush_time = buffer_flush_time
        self.run_ids: dict[str, str] = {}
        self._metrics: dict[str, list[Metric]] = {}
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._closed = False
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
        else:
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment_name,
                    artifact_location=None
                    if artifact_location is None
                    else artifact_location.resolve().as_uri(),
                    tags=dict(experiment_tags or {}),
                )
            except MlflowException:
                # Made meanwhile by another store on the same tracking server.
                found = self.client.get_experiment_by_name(experiment_name)
                if found is None:
                    raise
                self.experiment_id = found.experiment_id

    def _run_id(self, run: str) -> str:
        run_id = self.run_ids.get(run)
        if run_id is None:
            name = f"{run}-{self.job_id}-{self.run_name}"
            tags = {
                **self.run_tags,
                "site": run,
                "job_id": self.job_id,
                "job_name": self.job_name,
                "run_name": name,
            }
            created = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            run_id = self.run_ids[run] = created.info.run_id
        return run_id

    def write(self, run: str, record: Record) -> None:
        """``record`` into ``run``, by the module's table. MLflow's refusals raise (the
        caller notes them); the rest of the record's run is unaffected."""
        kind, key, value, step = record.data_type, record.key, record.value, record.step
        with self._lock:
            if self._closed:
                return
            run_id = self._run_id(run)
            if kind in ("SCALAR", "METRIC", "SCALARS", "METRICS"):
                if kind in ("SCALAR", "METRIC"):
                    numbers = {key: value}
                elif kind == "SCALARS":
                    numbers = {f"{key}/{name}": v for name, v in value.items()}
                else:
                    numbers = dict(value)
                refused = [p for p in map(mlflow_name_problem, numbers) if p is not None]
                stamp = int(time.time() * 1000)
                self._metrics.setdefault(run, []).extend(
                    self._metric_class(name, float(v), stamp, step)
                    for name, v in numbers.items()
                    if mlflow_name_problem(name) is None
                )
                if time.monotonic() - self._last_flush >= self.buffer_flush_time or (
                    len(self._metrics[run]) >= MLFLOW_BATCH
                ):
                    self._flush_metrics()
                if refused:
                    raise ValueError("; ".join(refused))
            elif kind in ("PARAMETER", "PARAMETERS"):
                entries = value if kind == "PARAMETERS" else {key: value}
                refused = [p for p in map(mlflow_name_problem, entries) if p is not None]
                if refused:
                    raise ValueError("; ".join(refused))
                params = [self._param_class(name, str(v)) for name, v in entries.items()]
                for start in range(0, len(params), 100):  # MLflow's bound on params per batch
                    self.client.log_batch(run_id, params=params[start : start + 100])
            elif kind in ("TAG", "TAGS"):
                entries = value if kind == "TAGS" else {key: value}
                taken = sorted(IDENTITY_TAGS & set(entries))
                if taken:
                    raise ValueError(f"tags {taken} say whose run it is and are set by the server")
                tags = [self._tag_class(name, str(v)) for name, v in entries.items()]
                for start in range(0, len(tags), MLFLOW_BATCH):
                    self.client.log_batch(run_id, tags=tags[start : start + MLFLOW_BATCH])
            elif kind == "TEXT":
                artifact = _safe_artifact_path(record.path or f"{_folder_part(key)}.txt")
                if artifact is None:
                    raise ValueError(
                        f"text {key!r}: path {record.path!r} is not a file path inside the run"
                    )
                self.client.log_text(run_id, value, artifact)

    def _flush_metrics(self) -> None:
        """Send the buffered metrics (the lock is held)."""
        self._last_flush = time.monotonic()
        pending, self._metrics = self._metrics, {}
        for run, metrics in pending.items():
            run_id = self._run_id(run)
            for start in range(0, len(metrics), MLFLOW_BATCH):
                self.client.log_batch(run_id, metrics=metrics[start : start + MLFLOW_BATCH])

    def flush(self) -> None:
        with self._lock:
            if not self._closed:
                self._flush_metrics()

    def close(self) -> None:
        """Send what is buffered and mark every run finished."""
        with self._lock:
            if self._closed:
                return
            try:
                self._flush_metrics()
            finally:
                self._closed = True
                for run_id in self.run_ids.values():
                    self.client.set_terminated(run_id)


# --- a run's trackers -------------------------------------------------------------------------

Store = TensorBoardStore | MlflowStore


@dataclass
class _Sink:
    """One store and the records it takes: ``runs`` maps each site it receives to its run
    (None: every site, each into its own run); ``aggregate_run`` receives the aggregates."""

    store: Store
    name: str
    runs: Mapping[str, str] | None = None
    aggregate_run: str | None = None

    def run_for(self, site: str) -> str | None:
        return site if self.runs is None else self.runs.get(site)


class Tracking:
    """A run's trackers. Every method is safe to call from several threads at once."""

    def __init__(self, sinks: Sequence[_Sink], *, job_id: str) -> None:
        self._sinks = list(sinks)
        self.job_id = job_id
        self.problems: list[str] = []
        self._problems_lock = threading.Lock()

    def _note(self, tracker: str, what: str, exc: BaseException) -> None:
        message = f"{tracker}: {what}: {exc}"
        log.warning("job %s: experiment tracking skipped %s", self.job_id, message)
        with self._problems_lock:
            if len(self.problems) < MAX_PROBLEMS:
                self.problems.append(message)

    def site_record(self, site: str, frame: Mapping[str, Any]) -> None:
        """One checked ``log`` frame from ``site``'s script, into every tracker that takes
        that site's records."""
        record = record_of(frame)
        for sink in self._sinks:
            run = sink.run_for(site)
            if run is None:
                continue
            try:
                sink.store.write(run, record)
            except Exception as exc:  # a tracker's refusal must not fail the site's task
                self._note(sink.name, f"{record.data_type} {record.key!r} of {site}", exc)

    def aggregate(self, round_number: int, metrics: Mapping[str, float]) -> None:
        """The round's aggregated metrics, at step ``round_number``, into the server side's
        trackers; every tracker's buffered records are sent (a round is a natural point)."""
        record = Record(
            data_type="METRICS",
            key="aggregate",
            value={key: float(value) for key, value in metrics.items()},
            step=round_number,
        )
        for sink in self._sinks:
            try:
                if sink.aggregate_run is not None and metrics:
                    sink.store.write(sink.aggregate_run, record)
                sink.store.flush()
            except Exception as exc:
                self._note(sink.name, f"round {round_number}'s aggregate", exc)

    def close(self) -> None:
        """Flush and close every tracker; MLflow's runs are marked finished."""
        for sink in self._sinks:
            try:
                sink.store.close()
            except Exception as exc:
                self._note(sink.name, "closing", exc)


def _store(
    config: TensorBoardConfig | MlflowConfig,
    *,
    base: Path,
    job_name: str,
    job_id: str,
) -> Store:
    if isinstance(config, TensorBoardConfig):
        return TensorBoardStore(base / config.tb_folder)
    uri = config.tracking_uri or file_store_uri(base / DEFAULT_MLFLOW_FOLDER)
    return MlflowStore(
        tracking_uri=uri,
        experiment_name=config.experiment_name or job_name,
        job_name=job_name,
        job_id=job_id,
        run_name=config.run_name,
        experiment_tags=config.experiment_tags,
        run_tags=config.run_tags,
        artifact_location=None
        if config.artifact_location is None
        else base / config.artifact_location,
        buffer_flush_time=config.buffer_flush_time,
    )


def open_tracking(
    trackers: Sequence[Mapping[str, Any]],
    *,
    workspace: Path,
    job_name: str,
    job_id: str,
    sites: Sequence[str],
) -> Tracking:
    """The :class:`Tracking` of a run in ``workspace`` over ``sites``, from the spec's
    checked tracker list. A bad tracker raises :class:`TrackingConfigError` naming it, and
    nothing stays open."""
    sinks: list[_Sink] = []
    aggregate = aggregate_run_name(sites)
    try:
        for index, tracker in enumerate(trackers):
            where = f"experiment_tracking[{index}]"
            kind = tracker.get("tracking_type")
            config = check_tracking_config(
                kind, tracker.get("tracking_config"), f"{where}.tracking_config"
            )
            if tracker.get("server_side", True):
                store = _store(config, base=workspace / "server", job_name=job_name, job_id=job_id)
                sinks.append(_Sink(store, f"{kind} (server)", None, aggregate))
            if tracker.get("client_side", False):
                chosen = tracker.get("clients")
                unknown = sorted(set(chosen or ()) - set(sites))
                if unknown:
                    raise TrackingConfigError(
                        f"{where}.clients: no site {', '.join(unknown)} in this run "
                        f"(its sites: {', '.join(sites)})"
                    )
                for site in chosen or sites:
                    base = workspace / "sites" / site
                    store = _store(config, base=base, job_name=job_name, job_id=job_id)
                    # A site's own TensorBoard folder holds only its records: no sub-folder.
                    run = "" if isinstance(store, TensorBoardStore) else site
                    sinks.append(_Sink(store, f"{kind} ({site})", {site: run}, None))
    except BaseException:
        for sink in sinks:
            sink.store.close()
        raise
    return Tracking(sinks, job_id=job_id)


# --- a finished job's points (the portal) -----------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One stored metric point: ``site`` None is a round's aggregate; ``source`` is where it
    came from (``log``: the script logged it; ``result``: its train result's metrics;
    ``aggregate``)."""

    site: str | None
    round: int | None
    key: str
    value: float
    step: int | None
    source: str = "log"


def _point_records(points: Iterable[Point]) -> list[tuple[str, Record]]:
    """Each point as a scalar in its site's run (the aggregates in the aggregate run), at its
    step, else its round. A stored point no longer knows its data type, so each is one scalar
    under its own key (SCALARS' points are keyed ``<tag>/<name>`` already). A train result's
    metrics are keyed ``result/<key>``: a site may log the same name itself."""
    points = list(points)
    aggregate = aggregate_run_name(p.site for p in points if p.site is not None)
    out = []
    for point in points:
        step = point.step if point.step is not None else point.round
        key = f"result/{point.key}" if point.source == "result" else point.key
        record = Record(data_type="SCALAR", key=key, value=point.value, step=step or 0)
        out.append((aggregate if point.site is None else point.site, record))
    return out


def _write_points(store: Store, points: Iterable[Point]) -> list[str]:
    problems = []
    try:
        for run, record in _point_records(points):
            try:
                store.write(run, record)
            except ValueError as exc:  # a name the tracker refuses: the others still go
                problems.append(f"{run}: {exc}")
    finally:
        store.close()
    return problems


def write_tensorboard(points: Iterable[Point], dest: Path) -> list[str]:
    """``points`` as event files under ``dest``: a folder per site, and ``aggregate``.
    Returns why points were left out (none: TensorBoard takes any tag)."""
    return _write_points(TensorBoardStore(dest), points)


def write_mlflow(
    points: Iterable[Point],
    tracking_uri: str,
    experiment_name: str,
    *,
    job_name: str,
    job_id: str,
    run_name: str | None = None,
    experiment_tags: Mapping[str, str] | None = None,
    run_tags: Mapping[str, str] | None = None,
) -> list[str]:
    """``points`` as MLflow runs (one per site, and ``aggregate``) in ``experiment_name``.
    Returns why points were left out: keys MLflow refuses as metric names."""
    store = MlflowStore(
        tracking_uri=tracking_uri,
        experiment_name=experiment_name,
        job_name=job_name,
        job_id=job_id,
        run_name=run_name,
        experiment_tags=experiment_tags,
        run_tags=run_tags,
        buffer_flush_time=3600,  # one batch per run at close
    )
    return _write_points(store, points)
