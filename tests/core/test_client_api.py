"""The Client API as a training script sees it, driven by a real ``ScriptProcess``.

Starting a child costs a Python interpreter plus torch (``client_agent.api`` imports it through
the wire format), so one scripted child plays a whole task for several tests: the misuse it
tries is recorded in a JSON report that the tests read, and the runtime's side (result file,
log frames, exit code) is kept next to it.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import client_agent.api as flare
from client_agent.analytics import LogRecordError
from client_agent.api import ClientAPIError
from client_agent.fl_model import FLModel, ParamsType
from client_agent.runtime import ENV_ADDR, TASK_TRAIN, ScriptFailed, ScriptProcess, Task
from client_agent.wire import read_model_file, write_model_file

SITE = "site-7"
JOB = "hello-20250101-000000-abcd"


def write_script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def script_process(tmp: Path, script: Path, *args: str) -> ScriptProcess:
    return ScriptProcess(
        script=script,
        args=list(args),
        site_name=SITE,
        job_id=JOB,
        workdir=tmp / "work",
        log_path=tmp / "log.txt",
        connect_timeout=60,
    )


def train_task(tmp: Path, model_path: Path | None, current_round: int = 0) -> Task:
    return Task(
        task_id=f"{JOB}:{current_round}:{SITE}",
        task_name=TASK_TRAIN,
        model_path=None if model_path is None else str(model_path),
        result_path=str(tmp / f"result-{current_round}.safetensors"),
        current_round=current_round,
        total_rounds=5,
        meta={"learning_rate": 0.01},
    )


# --------------------------------------------------------------------------------------------
# Before init(), in this process
# --------------------------------------------------------------------------------------------

API_CALLS: dict[str, Callable[[], object]] = {
    "is_running": flare.is_running,
    "receive": flare.receive,
    "send": lambda: flare.send(FLModel(params={"w": torch.zeros(1)})),
    "log": lambda: flare.log("loss", 0.5),
    "get_site_name": flare.get_site_name,
    "get_job_id": flare.get_job_id,
    "is_train": flare.is_train,
    "is_evaluate": flare.is_evaluate,
    "is_submit_model": flare.is_submit_model,
    "system_info": flare.system_info,
    "get_config": flare.get_config,
}


@pytest.fixture
def no_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flare, "_client", None)
    monkeypatch.delenv(ENV_ADDR, raising=False)


@pytest.mark.usefixtures("no_client")
@pytest.mark.parametrize("call", sorted(API_CALLS))
def test_every_call_before_init_raises_client_api_error_naming_the_call(call: str) -> None:
    with pytest.raises(ClientAPIError) as info:
        API_CALLS[call]()

    assert f"flare.{call}()" in str(info.value)
    assert "flare.init()" in str(info.value)


@pytest.mark.usefixtures("no_client")
def test_init_outside_a_runtime_says_how_to_run_the_script() -> None:
    with pytest.raises(ClientAPIError) as info:
        flare.init()

    message = str(info.value)
    assert ENV_ADDR in message
    assert "recipe.execute(SimEnv" in message
    assert "site agent" in message
    assert flare._client is None


@pytest.mark.usefixtures("no_client")
def test_init_with_an_unreachable_runtime_raises_client_api_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_ADDR, str(tmp_path / "nobody-listens.sock"))

    with pytest.raises(ClientAPIError, match="cannot reach the runtime"):
        flare.init()
    assert flare._client is None


@pytest.mark.usefixtures("no_client")
def test_init_on_a_rank_other_than_zero_is_refused() -> None:
    with pytest.raises(ClientAPIError, match="rank 0"):
        flare.init(rank=1)


# --------------------------------------------------------------------------------------------
# One task, end to end, with a real child process
# --------------------------------------------------------------------------------------------

SCENARIO = """
import json
import sys

import numpy as np

import client_agent.api as flare

report = {}


def attempt(name, call):
    try:
        call()
    except Exception as exc:
        report[name] = [type(exc).__name__, str(exc)]
    else:
        report[name] = None


flare.init()
flare.log("setup", 1)  # before any task: no round yet
attempt("send_before_receive", lambda: flare.send(flare.FLModel(params={"w": np.zeros(2)})))

report["is_running"] = flare.is_running()
model = flare.receive()
report["received"] = {
    "current_round": model.current_round,
    "total_rounds": model.total_rounds,
    "params_type": model.params_type.value,
    "params": {name: t.tolist() for name, t in model.params.items()},
    "dtypes": {name: str(t.dtype) for name, t in model.params.items()},
    "meta": model.meta,
    "get_site_name": flare.get_site_name(),
    "get_job_id": flare.get_job_id(),
    "system_info": flare.system_info(),
    "is_train": flare.is_train(),
    "is_evaluate": flare.is_evaluate(),
    "is_submit_model": flare.is_submit_model(),
    "receive_again_is_same": flare.receive() is model,
}

attempt("send_dict", lambda: flare.send({name: t * 2 for name, t in model.params.items()}))
attempt("send_without_params", lambda: flare.send(flare.FLModel(metrics={"accuracy": 0.5})))
attempt("send_empty_params", lambda: flare.send(flare.FLModel(params={})))
attempt("log_string", lambda: flare.log("loss", "high"))
attempt("log_none", lambda: flare.log("loss", None))
attempt("log_bool", lambda: flare.log("loss", True))

flare.log("loss", 0.25, step=3)
flare.log("acc", np.float32(0.5), step=np.int64(4))
flare.send(
    flare.FLModel(
        params={name: t * 2 for name, t in model.params.items()},
        metrics={"accuracy": 0.75, "loss": 0.25},
        meta={"NUM_STEPS_CURRENT_ROUND": 12},
    )
)

report["after_end_receive"] = repr(flare.receive())
report["after_end_is_running"] = flare.is_running()
with open(sys.argv[1], "w") as fh:
    json.dump(report, fh)
"""

GLOBAL_PARAMS = {
    "fc.weight": torch.tensor([[1.0, -2.0], [0.5, 3.0]]),
    "fc.bias": torch.tensor([0.25, -0.75]),
    "bn.num_batches_tracked": torch.tensor(10, dtype=torch.int64),
}


@dataclass
class TaskRun:
    """What one scripted child did, seen from both sides."""

    report: dict[str, Any]
    result: FLModel
    logs: list[dict[str, Any]]
    exit_code: int | None


@pytest.fixture(scope="module")
def task_run(tmp_path_factory: pytest.TempPathFactory) -> TaskRun:
    tmp = tmp_path_factory.mktemp("task-run")
    script = write_script(tmp / "app", "client.py", SCENARIO)
    model_path = write_model_file(
        tmp / "global.safetensors", FLModel(params=GLOBAL_PARAMS, params_type=ParamsType.FULL)
    )
    report_path = tmp / "report.json"
    proc = script_process(tmp, script, str(report_path))
    logs: list[dict[str, Any]] = []
    proc.start()
    try:
        result_path = proc.run_task(train_task(tmp, model_path, 2), on_log=logs.append, timeout=60)
        result = read_model_file(result_path)
    finally:
        exit_code = proc.stop(grace=30)
    assert report_path.exists(), (tmp / "log.txt").read_text()
    return TaskRun(
        report=json.loads(report_path.read_text()),
        result=result,
        logs=logs,
        exit_code=exit_code,
    )


def test_send_before_receive_raises_client_api_error(task_run: TaskRun) -> None:
    kind, message = task_run.report["send_before_receive"]

    assert kind == "ClientAPIError"
    assert "flare.send() called before flare.receive()" in message


def test_script_receives_the_global_model_and_the_task(task_run: TaskRun) -> None:
    received = task_run.report["received"]

    assert task_run.report["is_running"] is True
    assert received["current_round"] == 2
    assert received["total_rounds"] == 5
    assert received["params_type"] == "FULL"
    assert received["params"] == {name: t.tolist() for name, t in GLOBAL_PARAMS.items()}
    assert received["dtypes"] == {
        "fc.weight": "torch.float32",
        "fc.bias": "torch.float32",
        "bn.num_batches_tracked": "torch.int64",
    }
    # NVFlare's keys (FLMetaKey's values), and FedPortal's earlier spelling of the same.
    assert received["meta"]["site_name"] == received["meta"]["SITE_NAME"] == SITE
    assert received["meta"]["job_id"] == received["meta"]["JOB_ID"] == JOB
    assert received["meta"]["current_round"] == 2
    assert received["meta"]["total_rounds"] == received["total_rounds"]
    assert received["meta"]["TASK_NAME"] == "train"
    assert received["meta"]["learning_rate"] == 0.01  # the task's own meta comes through
    assert received["receive_again_is_same"] is True


def test_script_sees_its_site_job_and_task_kind(task_run: TaskRun) -> None:
    received = task_run.report["received"]

    assert received["get_site_name"] == SITE
    assert received["get_job_id"] == JOB
    assert received["system_info"] == {"site_name": SITE, "job_id": JOB}
    assert (received["is_train"], received["is_evaluate"], received["is_submit_model"]) == (
        True,
        False,
        False,
    )


def test_send_of_a_dict_instead_of_an_flmodel_raises_type_error(task_run: TaskRun) -> None:
    kind, message = task_run.report["send_dict"]

    assert kind == "TypeError"
    assert "FLModel" in message
    assert "dict" in message


@pytest.mark.parametrize("attempt", ["send_without_params", "send_empty_params"])
def test_a_train_result_without_params_is_refused(task_run: TaskRun, attempt: str) -> None:
    kind, message = task_run.report[attempt]

    assert kind == "ClientAPIError"
    assert "'train'" in message
    assert "params" in message


@pytest.mark.parametrize("attempt", ["log_string", "log_none", "log_bool"])
def test_log_of_a_non_number_raises_type_error(task_run: TaskRun, attempt: str) -> None:
    kind, message = task_run.report[attempt]

    # LogRecordError is a TypeError that names the call and what is wrong with it.
    assert kind == "LogRecordError" and issubclass(LogRecordError, TypeError)
    assert "'loss'" in message
    assert "number" in message


def test_result_file_holds_exactly_what_the_script_sent(task_run: TaskRun) -> None:
    result = task_run.result

    assert result.params is not None
    assert set(result.params) == set(GLOBAL_PARAMS)
    for name, tensor in GLOBAL_PARAMS.items():
        sent = result.params[name]
        assert sent.dtype == tensor.dtype
        assert torch.equal(sent, tensor * 2), name
    assert result.params_type is ParamsType.FULL
    assert result.metrics == {"accuracy": 0.75, "loss": 0.25}
    assert result.meta == {"NUM_STEPS_CURRENT_ROUND": 12}
    assert result.weight == 12.0
    assert result.current_round == 2


def test_log_frames_reach_on_log_with_key_value_step_and_round(task_run: TaskRun) -> None:
    # The refused log() calls sent nothing.
    def frame(key: str, value: float, step: int | None, rnd: int | None) -> dict[str, Any]:
        return {
            "type": "log",
            "key": key,
            "data_type": "SCALAR",
            "value": value,
            "step": step,
            "round": rnd,
            "writer": None,
            "kwargs": {},
            "points": [(key, value)],  # added by the runtime: the frame's numeric points
        }

    assert task_run.logs == [
        frame("setup", 1.0, None, None),
        frame("loss", 0.25, 3, 2),
        frame("acc", 0.5, 4, 2),
    ]


def test_receive_returns_none_and_is_running_false_after_stop(task_run: TaskRun) -> None:
    assert task_run.report["after_end_receive"] == "None"
    assert task_run.report["after_end_is_running"] is False
    assert task_run.exit_code == 0  # the script left its loop and ended by itself


# --------------------------------------------------------------------------------------------
# Scripts that fail
# --------------------------------------------------------------------------------------------


def test_a_script_that_fails_before_init_raises_script_failed_with_its_stderr(
    tmp_path: Path,
) -> None:
    script = write_script(
        tmp_path / "app",
        "client.py",
        """
        import sys
        for i in range(40):
            print(f"loading shard {i}", file=sys.stderr)
        print("FileNotFoundError: /data/cifar10 does not exist", file=sys.stderr)
        sys.exit(3)
        """,
    )
    proc = script_process(tmp_path, script)
    proc.start()
    try:
        with pytest.raises(ScriptFailed) as info:
            proc.run_task(train_task(tmp_path, None), timeout=60)
    finally:
        proc.stop(grace=5)

    message = str(info.value)
    assert info.value.site == SITE
    assert message.startswith(f"client script of {SITE} exited with code 3 before")
    assert "flare.init()" in message
    assert "FileNotFoundError: /data/cifar10 does not exist" in message
    assert "loading shard 39" in message
    assert "loading shard 0\n" not in message  # the end of the output, not all of it


def test_a_script_that_dies_mid_task_raises_script_failed(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "app",
        "client.py",
        """
        import os
        import sys

        import client_agent.api as flare

        flare.init()
        flare.receive()
        print("RuntimeError: CUDA out of memory", file=sys.stderr, flush=True)
        os._exit(7)
        """,
    )
    model_path = write_model_file(tmp_path / "g.safetensors", FLModel(params=GLOBAL_PARAMS))
    proc = script_process(tmp_path, script)
    proc.start()
    try:
        with pytest.raises(ScriptFailed) as info:
            proc.run_task(train_task(tmp_path, model_path), timeout=60)
    finally:
        proc.stop(grace=5)

    message = str(info.value)
    assert info.value.site == SITE
    assert "exited with code 7 during its task" in message
    assert "CUDA out of memory" in message
    assert not (tmp_path / "result-0.safetensors").exists()
