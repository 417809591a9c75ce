"""The Client API: what a training script calls to take part in a federated job.

Used as ``import client_agent.api as flare``, with NVFlare's names, so a script written for
``nvflare.client`` runs after changing only that import::

    flare.init()
    while flare.is_running():
        input_model = flare.receive()
        model.load_state_dict(input_model.params)
        ...train as before...
        flare.send(flare.FLModel(params=model.cpu().state_dict(),
                                 meta={"NUM_STEPS_CURRENT_ROUND": steps}))

The script does not know where the federation is: the runtime that started it (``SimEnv`` or
the site agent) puts the address of a local socket in its environment. Only global rank 0
of a multi-process script may talk to the runtime.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import select
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from client_agent import wire
from client_agent.analytics import AnalyticsDataType, log_frame
from client_agent.config import (
    EXCHANGE_FORMAT_META_KEY,
    EXCLUDE_VARS_META_KEY,
    TRANSFER_TYPE_META_KEY,
    ExchangeFormat,
)
from client_agent.fl_model import (
    LEGACY_JOB_ID_META_KEY,
    LEGACY_SITE_NAME_META_KEY,
    TASK_NAME_META_KEY,
    FLMetaKey,
    FLModel,
    ParamsType,
)
from client_agent.runtime import (
    ENV_ADDR,
    ENV_JOB,
    ENV_SITE,
    ENV_TOKEN,
    TASK_SUBMIT_MODEL,
    TASK_TRAIN,
    TASK_VALIDATE,
)

__all__ = [
    "AnalyticsDataType",
    "FLMetaKey",
    "FLModel",
    "ParamsType",
    "clear",
    "evaluate",
    "get_config",
    "get_job_id",
    "get_site_name",
    "get_task_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "receive",
    "send",
    "shutdown",
    "system_info",
    "train",
]


class ClientAPIError(RuntimeError):
    """The Client API was used out of order (``send`` before ``receive``, no ``init``, …)."""


class _Client:
    def __init__(
        self,
        sock: socket.socket,
        site_name: str,
        job_id: str,
        client_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.sock = sock
        self.site_name = site_name
        self.job_id = job_id
        self.client_config = dict(client_config or {})
        self.task: dict[str, Any] | None = None
        self.model: FLModel | None = None
        self.ended = False
        self.send_lock = threading.Lock()  # log() may be called from other threads

    def send_frame(self, message: dict[str, Any]) -> None:
        with self.send_lock:
            wire.send_frame(self.sock, message)

    def next_message(self, timeout: float | None) -> bool:
        """Read the next task (True) or the end of the job (False); TimeoutError if none."""
        # Wait for the first byte only: a timeout in the middle of a frame would lose its
        # start and put the stream out of step.
        if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
            raise TimeoutError
        try:
            message = wire.recv_frame(self.sock)
        except ConnectionError:
            # The runtime went away: treat it as the end of the job rather than a crash in
            # the middle of the user's training loop.
            self.ended = True
            return False
        if message["type"] == "end":
            self.ended = True
            return False
        if message["type"] != "task":
            raise ClientAPIError(f"unexpected message from the runtime: {message['type']!r}")
        self.task = message
        self.model = None
        return True


_client: _Client | None = None


def init(rank: int | str | None = None, config_file: str | None = None) -> None:
    """Connect to the runtime that started this script. Calling it again does nothing.

    ``rank`` is accepted for NVFlare compatibility; a rank other than 0 is refused because only
    global rank 0 talks to the runtime (broadcast the received model to the other ranks).
    ``config_file`` is accepted and ignored: the runtime passes everything it needs.
    """
    global _client
    if _client is not None:
        return
    if rank not in (None, 0, "0"):
        raise ClientAPIError(
            f"flare.init(rank={rank!r}): only global rank 0 may talk to the FedPortal runtime; "
            "call the Client API on rank 0 and broadcast the model to the other ranks"
        )
    address = os.environ.get(ENV_ADDR)
    if not address:
        raise ClientAPIError(
            f"flare.init(): this process was not started by a FedPortal runtime ({ENV_ADDR} is "
            "not set). Run the script through a recipe, e.g. recipe.execute(SimEnv(...)), or "
            "the site agent."
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
        wire.send_frame(
            sock, {"type": "hello", "token": os.environ.get(ENV_TOKEN, ""), "pid": os.getpid()}
        )
        welcome = wire.recv_frame(sock)
    except OSError as exc:
        sock.close()
        raise ClientAPIError(
            f"flare.init(): cannot reach the runtime at {address}: {exc}"
        ) from None
    if welcome.get("type") != "welcome":
        sock.close()
        raise ClientAPIError(f"flare.init(): the runtime refused this script: {welcome}")
    _client = _Client(
        sock,
        site_name=str(welcome.get("site_name") or os.environ.get(ENV_SITE, "")),
        job_id=str(welcome.get("job_id") or os.environ.get(ENV_JOB, "")),
        client_config=welcome.get("client_config") or {},
    )


def _require_client(caller: str) -> _Client:
    if _client is None:
        raise ClientAPIError(f"flare.{caller}() called before flare.init()")
    return _client


def is_running() -> bool:
    """True while the job has work for this site; blocks until the next task arrives."""
    client = _require_client("is_running")
    if client.ended:
        return False
    if client.task is not None:
        return True
    return client.next_message(timeout=None)


def receive(timeout: float | None = None) -> FLModel | None:
    """The current task's global model, or None once the job is over or ``timeout`` passes."""
    client = _require_client("receive")
    if client.task is None:
        if client.ended:
            return None
        try:
            if not client.next_message(timeout=timeout):
                return None
        except TimeoutError:
            return None
    assert client.task is not None
    if client.model is None:
        task = client.task
        model = wire.read_model_file(task["model_path"]) if task.get("model_path") else FLModel()
        model.params_type = model.params_type or (ParamsType.FULL if model.params else None)
        model.current_round = task["current_round"]
        model.total_rounds = task["total_rounds"]
        model.start_round = task.get("start_round", 0)
        if model.params and _task_meta(task, EXCHANGE_FORMAT_META_KEY) == ExchangeFormat.NUMPY:
            model.params = {name: tensor.numpy() for name, tensor in model.params.items()}
        model.meta = {
            **model.meta,
            **task.get("meta", {}),
            # NVFlare's keys, then FedPortal's earlier spelling of the same.
            FLMetaKey.JOB_ID: client.job_id,
            FLMetaKey.SITE_NAME: client.site_name,
            FLMetaKey.CURRENT_ROUND: model.current_round,
            FLMetaKey.TOTAL_ROUNDS: model.total_rounds,
            FLMetaKey.START_ROUND: model.start_round,
            LEGACY_JOB_ID_META_KEY: client.job_id,
            LEGACY_SITE_NAME_META_KEY: client.site_name,
            TASK_NAME_META_KEY: task["task_name"],
        }
        client.model = model
    return client.model


def send(model: FLModel, clear_cache: bool = True) -> None:
    """Send this site's result for the current task.

    A train result must carry ``params``; ``params_type`` defaults to FULL. With
    ``clear_cache=False`` the task stays current (NVFlare's flag), so ``receive()`` returns the
    same model again.
    """
    client = _require_client("send")
    if not isinstance(model, FLModel):
        raise TypeError(f"flare.send() expects an FLModel, got {type(model).__name__}")
    if client.task is None:
        raise ClientAPIError(
            "flare.send() called before flare.receive(): there is no task to answer"
        )
    task = client.task
    if task["task_name"] in (TASK_TRAIN, TASK_SUBMIT_MODEL) and not model.params:
        raise ClientAPIError(
            f"flare.send(): the {task['task_name']!r} task needs FLModel.params (the weights)"
        )
    if model.current_round is None:
        model.current_round = task["current_round"]
    exclude_vars = _task_meta(task, EXCLUDE_VARS_META_KEY)
    kept_at_site = re.compile(exclude_vars) if exclude_vars else None
    if task["task_name"] == TASK_TRAIN and kept_at_site and model.params:
        # These params never leave the site: the job's exclude_vars keeps them out.
        model = dataclasses.replace(model, params=_without(model.params, kept_at_site))
    if (
        task["task_name"] == TASK_TRAIN
        and _task_meta(task, TRANSFER_TYPE_META_KEY) == ParamsType.DIFF
        and model.params_type in (None, ParamsType.FULL)
    ):
        model = _as_diff(model, task, kept_at_site)
    wire.write_model_file(task["result_path"], model)
    client.send_frame({"type": "result", "task_id": task["task_id"]})
    if clear_cache:
        client.task = None
        client.model = None


def log(key: str, value: Any, data_type: Any = AnalyticsDataType.SCALAR, **kwargs: Any) -> None:
    """Record a metric or a tracking record: NVFlare's ``flare.log``.

    ``data_type`` is an :class:`AnalyticsDataType`: SCALAR (a number, the default), SCALARS (a
    dict of numbers, TensorBoard's ``add_scalars``), METRIC / METRICS (MLflow's), TEXT,
    PARAMETER(S) or TAG(S). ``global_step=`` (NVFlare's keyword; ``step=`` is the same) is the
    point's step. Numbers reach the run's metrics and the portal's charts; every record reaches
    the job's experiment trackers (``add_experiment_tracking``). Other keyword arguments
    (``writer=``, ``path=`` of a TEXT artifact, …) go with the record for the trackers.
    """
    client = _require_client("log")
    global_step = kwargs.pop("global_step", None)
    step = kwargs.pop("step", None)
    if global_step is not None and step is not None:
        raise TypeError(f"flare.log({key!r}, …): give global_step or step, not both")
    writer = kwargs.pop("writer", None)
    frame = log_frame(  # LogRecordError (a TypeError) names a bad argument
        key,
        value,
        data_type,
        step=global_step if global_step is not None else step,
        current_round=client.task["current_round"] if client.task else None,
        writer=writer,
        kwargs=kwargs,
    )
    client.send_frame(frame)


def _current_task_name(caller: str) -> str | None:
    client = _require_client(caller)
    if client.task is None and not client.ended:
        client.next_message(timeout=None)
    return None if client.task is None else str(client.task["task_name"])


def is_train() -> bool:
    """Whether the current task asks for training (fetches the next task if none is current)."""
    return _current_task_name("is_train") == TASK_TRAIN


def is_evaluate() -> bool:
    """Whether the current task asks only for metrics of the received model."""
    return _current_task_name("is_evaluate") == TASK_VALIDATE


def is_submit_model() -> bool:
    """Whether the current task asks for this site's best local model."""
    return _current_task_name("is_submit_model") == TASK_SUBMIT_MODEL


def get_task_name() -> str | None:
    """The current task's name: ``"train"``, ``"validate"`` or ``"submit_model"`` (fetches the
    next task if none is current); None once the job is over."""
    return _current_task_name("get_task_name")


def clear() -> None:
    """Forget the current task's model, as NVFlare's ``flare.clear()``: the next ``receive()``
    reads it again from its file (the task itself stays current until it is answered)."""
    _require_client("clear").model = None


def get_site_name() -> str:
    return _require_client("get_site_name").site_name


def get_job_id() -> str:
    return _require_client("get_job_id").job_id


def system_info() -> dict[str, str]:
    """NVFlare's ``system_info()``: this site's name and the job's id."""
    client = _require_client("system_info")
    return {"site_name": client.site_name, "job_id": client.job_id}


def get_config() -> dict[str, Any]:
    """The job's client config (what ``recipe.add_client_config`` set), with the current
    task's metadata (site, job, task name, round, total rounds) over it."""
    client = _require_client("get_config")
    task = client.task or {}
    return {
        **client.client_config,
        "site_name": client.site_name,
        "job_id": client.job_id,
        "task_name": task.get("task_name"),
        "current_round": task.get("current_round"),
        "total_rounds": task.get("total_rounds"),
    }


def shutdown() -> None:
    """Close the connection to the runtime; later calls need a new ``init()``."""
    global _client
    if _client is not None:
        _client.sock.close()
        _client = None


def _task_meta(task: Mapping[str, Any], key: str) -> Any:
    meta = task.get("meta") or {}
    return meta.get(key)


def _without(params: Mapping[str, Any], pattern: re.Pattern[str]) -> dict[str, Any]:
    """``params`` but those whose names ``pattern`` matches (``re.search``, NVFlare's rule)."""
    return {name: value for name, value in params.items() if not pattern.search(name)}


def _as_diff(
    model: FLModel, task: Mapping[str, Any], kept_at_site: re.Pattern[str] | None
) -> FLModel:
    """``model`` with ``params = local − received`` and ``params_type=DIFF``: what a DIFF job's
    train task asks for (NVFlare's ``flare.send`` does the same). The received weights are read
    again from the task's model file, which the script cannot change, so a script that trained
    the received tensors in place still sends the right change."""
    if not task.get("model_path"):
        raise ClientAPIError("flare.send(): this DIFF task came without a global model")
    received = wire.read_model_file(task["model_path"]).params or {}
    if kept_at_site:
        received = _without(received, kept_at_site)
    assert model.params is not None
    missing = sorted(set(received) - set(model.params))
    extra = sorted(set(model.params) - set(received))
    if missing or extra:
        raise ClientAPIError(
            "flare.send(): a DIFF job sends the change of every received tensor; "
            + (f"missing {missing[:5]}" if missing else f"not received: {extra[:5]}")
        )
    diff: dict[str, Any] = {}
    for name, local in model.params.items():
        base = received[name]
        if isinstance(local, np.ndarray):
            diff[name] = local - base.numpy().astype(local.dtype, copy=False)
        else:
            local_tensor = local.detach().cpu() if hasattr(local, "detach") else local
            diff[name] = local_tensor - base.to(local_tensor.dtype)
    return dataclasses.replace(model, params_type=ParamsType.DIFF, params=diff)


_Function = TypeVar("_Function", bound=Callable[..., Any])


def _with_received_model(function: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Call ``function`` with the received model as its first parameter (NVFlare's rule)."""
    parameters = list(inspect.signature(function).parameters)
    if not parameters:
        raise TypeError(
            f"{function.__name__}() must take the received FLModel as its first argument"
        )
    model = receive()
    return function(**{**kwargs, parameters[0]: model})


# Metrics that @flare.evaluate computed during a train task, sent with the train result.
_pending_train_metrics: dict[str, Any] | None = None


def train(_func: _Function | None = None, **_options: Any) -> Any:
    """NVFlare's ``@flare.train``: the decorated function gets the received model as its first
    argument and returns the FLModel to send, which is sent (with the metrics an
    ``@flare.evaluate`` function computed before it in the same task)."""

    def decorate(function: _Function) -> _Function:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            global _pending_train_metrics
            result = _with_received_model(function, kwargs)
            if not isinstance(result, FLModel):
                raise ClientAPIError(
                    f"@flare.train: {function.__name__}() must return an FLModel, "
                    f"got {type(result).__name__}"
                )
            if _pending_train_metrics is not None:
                result.metrics = _pending_train_metrics
                _pending_train_metrics = None
            send(result)
            return result

        return wrapper  # type: ignore[return-value]

    return decorate if _func is None else decorate(_func)


def evaluate(_func: _Function | None = None, **_options: Any) -> Any:
    """NVFlare's ``@flare.evaluate``: the decorated function gets the received model as its
    first argument and returns its metrics (a dict). In a validate task they are sent at once;
    in a train task they are kept and sent with the ``@flare.train`` function's model."""

    def decorate(function: _Function) -> _Function:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            global _pending_train_metrics
            metrics = _with_received_model(function, kwargs)
            if not isinstance(metrics, Mapping):
                raise ClientAPIError(
                    f"@flare.evaluate: {function.__name__}() must return a dict of metrics, "
                    f"got {type(metrics).__name__}"
                )
            if is_train():
                _pending_train_metrics = dict(metrics)
            else:
                send(FLModel(metrics=dict(metrics)))
            return metrics

        return wrapper  # type: ignore[return-value]

    return decorate if _func is None else decorate(_func)
