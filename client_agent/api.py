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

import numbers
import os
import select
import socket
import threading
from typing import Any

from client_agent import wire
from client_agent.fl_model import FLMetaKey, FLModel, ParamsType
from client_agent.runtime import (
    ENV_ADDR,
    ENV_JOB,
    ENV_SITE,
    ENV_TOKEN,
    TASK_SUBMIT_MODEL,
    TASK_TRAIN,
    TASK_VALIDATE,
)
from common.validators import is_number

__all__ = [
    "FLMetaKey",
    "FLModel",
    "ParamsType",
    "get_config",
    "get_job_id",
    "get_site_name",
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
]


class ClientAPIError(RuntimeError):
    """The Client API was used out of order (``send`` before ``receive``, no ``init``, …)."""


class _Client:
    def __init__(self, sock: socket.socket, site_name: str, job_id: str) -> None:
        self.sock = sock
        self.site_name = site_name
        self.job_id = job_id
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
        model.meta = {
            **model.meta,
            **task.get("meta", {}),
            FLMetaKey.JOB_ID: client.job_id,
            FLMetaKey.SITE_NAME: client.site_name,
            FLMetaKey.TASK_NAME: task["task_name"],
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
    wire.write_model_file(task["result_path"], model)
    client.send_frame({"type": "result", "task_id": task["task_id"]})
    if clear_cache:
        client.task = None
        client.model = None


def log(
    key: str, value: Any, step: int | None = None, data_type: Any = None, **kwargs: Any
) -> None:
    """Record a scalar metric; it reaches the run's metrics (and later the portal's charts).

    ``data_type`` and extra keyword arguments are accepted for NVFlare compatibility. Only
    numbers are supported.
    """
    client = _require_client("log")
    if not isinstance(key, str) or not key:
        raise ValueError(f"flare.log(): key must be a non-empty string, got {key!r}")
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if not is_number(value):
        raise TypeError(
            f"flare.log({key!r}, …): value must be a number, got {type(value).__name__}"
        )
    if step is not None and not isinstance(step, numbers.Integral):
        raise TypeError(f"flare.log({key!r}, …): step must be an int, got {type(step).__name__}")
    current_round = client.task["current_round"] if client.task else None
    client.send_frame(
        {
            "type": "log",
            "key": key,
            "value": float(value),
            "step": None if step is None else int(step),
            "round": current_round,
        }
    )


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


def get_site_name() -> str:
    return _require_client("get_site_name").site_name


def get_job_id() -> str:
    return _require_client("get_job_id").job_id


def system_info() -> dict[str, str]:
    """NVFlare's ``system_info()``: this site's name and the job's id."""
    client = _require_client("system_info")
    return {"site_name": client.site_name, "job_id": client.job_id}


def get_config() -> dict[str, Any]:
    """The current task's metadata (round, total rounds, task name)."""
    client = _require_client("get_config")
    task = client.task or {}
    return {
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
