"""NVFlare's Client API names, used as NVFlare's documentation shows, in a real script process:
``flare.log`` with each data type and ``global_step``, ``get_task_name``, ``clear``, the
``@flare.train`` / ``@flare.evaluate`` decorators, numpy params in a NumPy job, DIFF sent by
the API, ``exclude_vars`` dropped by the API, and every ``FLMetaKey`` member."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from client_agent.analytics import AnalyticsDataType
from client_agent.config import EXCHANGE_FORMAT_META_KEY, EXCLUDE_VARS_META_KEY
from client_agent.config import TRANSFER_TYPE_META_KEY as DIFF_KEY
from client_agent.fl_model import FLMetaKey, FLModel, ParamsType
from client_agent.runtime import TASK_TRAIN, TASK_VALIDATE, ScriptFailed, ScriptProcess, Task
from client_agent.wire import read_model_file, write_model_file

GLOBAL = {"w": torch.tensor([1.0, 2.0]), "bn.mean": torch.tensor([0.5])}


def run_script(
    tmp: Path, body: str, tasks: list[tuple[str, dict[str, Any]]]
) -> tuple[list[FLModel], list[dict[str, Any]], dict[str, Any]]:
    """Run ``body`` for ``tasks`` (name, meta); the results, the log frames, its report."""
    app = tmp / "app"
    app.mkdir()
    script = app / "client.py"
    script.write_text(textwrap.dedent(body))
    model_path = write_model_file(tmp / "global.safetensors", FLModel(params=GLOBAL))
    proc = ScriptProcess(
        script=script,
        args=[str(tmp / "report.json")],
        site_name="site-1",
        job_id="job-1",
        workdir=tmp / "work",
        log_path=tmp / "log.txt",
    )
    logs: list[dict[str, Any]] = []
    results = []
    proc.start()
    try:
        for index, (name, meta) in enumerate(tasks):
            task = Task(
                task_id=f"t{index}",
                task_name=name,
                model_path=str(model_path),
                result_path=str(tmp / f"result-{index}.safetensors"),
                current_round=index,
                total_rounds=len(tasks),
                meta=meta,
            )
            results.append(read_model_file(proc.run_task(task, on_log=logs.append, timeout=60)))
    finally:
        proc.stop(grace=30)
    report_path = tmp / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return results, logs, report


def test_log_carries_nvflare_data_types_and_global_step(tmp_path: Path) -> None:
    body = """
    import client_agent.api as flare
    from client_agent.api import AnalyticsDataType

    flare.init()
    model = flare.receive()
    flare.log("loss", 0.5, AnalyticsDataType.SCALAR, global_step=3)
    flare.log("train", {"loss": 0.5, "acc": 0.75}, data_type=AnalyticsDataType.SCALARS)
    flare.log("metrics", {"f1": 0.25}, AnalyticsDataType.METRICS, global_step=4)
    flare.log("note", "hello", AnalyticsDataType.TEXT, path="notes/a.txt")
    flare.log("lr", 0.01, AnalyticsDataType.PARAMETER)
    flare.send(flare.FLModel(params=model.params))
    """
    _, logs, _ = run_script(tmp_path, body, [(TASK_TRAIN, {})])

    got = [(f["key"], f["data_type"], f["step"], f["points"]) for f in logs]
    assert got == [
        ("loss", "SCALAR", 3, [("loss", 0.5)]),
        ("train", "SCALARS", None, [("train/loss", 0.5), ("train/acc", 0.75)]),
        ("metrics", "METRICS", 4, [("f1", 0.25)]),
        ("note", "TEXT", None, []),  # records for trackers only: no metric points
        ("lr", "PARAMETER", None, []),
    ]
    assert logs[3]["value"] == "hello" and logs[3]["kwargs"] == {"path": "notes/a.txt"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ('flare.log("x", 1.0, AnalyticsDataType.IMAGE)', "IMAGE is not supported"),
        ('flare.log("x", 1.0, "NOPE")', "data_type must be an AnalyticsDataType"),
        ('flare.log("x", {"a": "b"}, AnalyticsDataType.SCALARS)', "must be a number"),
        ('flare.log("x", 1.0, global_step=1.5)', "global_step must be an int"),
        ('flare.log("x", 1, global_step=1, step=1)', "not both"),
    ],
)
def test_log_refuses_what_it_cannot_carry_naming_it(
    tmp_path: Path, call: str, message: str
) -> None:
    body = f"""
    import json, sys
    import client_agent.api as flare
    from client_agent.api import AnalyticsDataType

    flare.init()
    model = flare.receive()
    try:
        {call}
        error = None
    except TypeError as exc:
        error = str(exc)
    json.dump({{"error": error}}, open(sys.argv[1], "w"))
    flare.send(flare.FLModel(params=model.params))
    """
    _, logs, report = run_script(tmp_path, body, [(TASK_TRAIN, {})])

    assert logs == []
    assert message in report["error"]


def test_task_name_clear_and_nvflare_meta_keys(tmp_path: Path) -> None:
    body = """
    import json, sys
    import client_agent.api as flare
    from client_agent.fl_model import FLMetaKey

    flare.init()
    report = {}
    while flare.is_running():
        name = flare.get_task_name()
        first = flare.receive()
        flare.clear()
        again = flare.receive()
        report[name] = {
            "reread": again is not first and bool((again.params["w"] == first.params["w"]).all()),
            "meta": {k: again.meta[k] for k in (FLMetaKey.JOB_ID, FLMetaKey.SITE_NAME,
                                                FLMetaKey.CURRENT_ROUND, FLMetaKey.TOTAL_ROUNDS)},
        }
        if flare.is_train():
            flare.send(flare.FLModel(params=again.params))
        else:
            flare.send(flare.FLModel(metrics={"accuracy": 1.0}))
    json.dump(report, open(sys.argv[1], "w"))
    """
    _, _, report = run_script(tmp_path, body, [(TASK_TRAIN, {}), (TASK_VALIDATE, {})])

    assert set(report) == {"train", "validate"}
    assert report["train"]["reread"] is True
    assert report["validate"]["meta"] == {
        "job_id": "job-1",
        "site_name": "site-1",
        "current_round": 1,
        "total_rounds": 2,
    }


def test_train_and_evaluate_decorators_send_as_nvflare_does(tmp_path: Path) -> None:
    body = """
    import client_agent.api as flare

    @flare.evaluate
    def score(input_model):
        return {"accuracy": float(input_model.params["w"].sum())}

    @flare.train
    def fit(input_model=None, step=1.0):
        return flare.FLModel(params={k: v + step for k, v in input_model.params.items()})

    flare.init()
    while flare.is_running():
        score()
        if flare.is_train():
            fit(step=2.0)
    """
    results, _, _ = run_script(tmp_path, body, [(TASK_TRAIN, {}), (TASK_VALIDATE, {})])

    trained, evaluated = results
    assert trained.params is not None
    assert torch.equal(trained.params["w"], GLOBAL["w"] + 2.0)
    assert trained.metrics == {"accuracy": 3.0}  # @flare.evaluate's, sent with the model
    assert evaluated.params in (None, {}) and evaluated.metrics == {"accuracy": 3.0}


def test_client_api_sends_diff_without_excluded_params_and_numpy_in_numpy_jobs(
    tmp_path: Path,
) -> None:
    body = """
    import json, sys
    import numpy as np
    import client_agent.api as flare

    flare.init()
    model = flare.receive()
    kind = type(model.params["w"]).__name__
    json.dump({"kind": kind}, open(sys.argv[1], "w"))
    flare.send(flare.FLModel(params={k: v * 3 for k, v in model.params.items()}))
    """
    meta = {DIFF_KEY: "DIFF", EXCLUDE_VARS_META_KEY: r"^bn\.", EXCHANGE_FORMAT_META_KEY: "numpy"}
    (result,), _, report = run_script(tmp_path, body, [(TASK_TRAIN, meta)])

    assert report["kind"] == "ndarray"
    assert result.params_type == ParamsType.DIFF and result.params is not None
    assert set(result.params) == {"w"}  # bn.mean never left the site
    assert torch.equal(result.params["w"], GLOBAL["w"] * 2)  # 3w − w


def test_a_script_that_sends_a_bad_log_frame_fails_with_the_reason(tmp_path: Path) -> None:
    body = """
    import client_agent.api as flare
    from client_agent import wire

    flare.init()
    flare.receive()
    wire.send_frame(flare._client.sock, {"type": "log", "key": "x", "data_type": "SCALAR",
                                         "value": "not a number"})
    flare.receive(timeout=30)
    """
    with pytest.raises(ScriptFailed, match="sent a bad log record"):
        run_script(tmp_path, body, [(TASK_TRAIN, {})])


def test_fl_meta_key_has_every_nvflare_member_and_value() -> None:
    # NVFlare 2.9's nvflare.apis.fl_constant.FLMetaKey, member by member.
    nvflare = {
        "NUM_STEPS_CURRENT_ROUND": "NUM_STEPS_CURRENT_ROUND",
        "PROCESSED_ALGORITHM": "PROCESSED_ALGORITHM",
        "PROCESSED_KEYS": "PROCESSED_KEYS",
        "INITIAL_METRICS": "initial_metrics",
        "FILTER_HISTORY": "filter_history",
        "CONFIGS": "configs",
        "VALIDATE_TYPE": "validate_type",
        "START_ROUND": "start_round",
        "CURRENT_ROUND": "current_round",
        "TOTAL_ROUNDS": "total_rounds",
        "JOB_ID": "job_id",
        "SITE_NAME": "site_name",
        "PROCESS_RC_FILE": "_process_rc.txt",
        "SUBMIT_MODEL_NAME": "submit_model_name",
        "AUTH_TOKEN": "auth_token",
        "AUTH_TOKEN_SIGNATURE": "auth_token_signature",
    }
    ours = {k: v for k, v in vars(FLMetaKey).items() if k.isupper()}
    assert ours == nvflare
    assert [m.value for m in AnalyticsDataType] == [
        "SCALARS", "SCALAR", "IMAGE", "TEXT", "LOG_RECORD", "PARAMETER", "PARAMETERS",
        "METRIC", "METRICS", "MODEL", "TAG", "TAGS", "INIT_DATA",
    ]  # fmt: skip


def test_get_fedprox_mu_reads_the_tasks_mu_as_nvflare_does() -> None:
    from client_agent.pt import get_fedprox_mu

    assert get_fedprox_mu(FLModel(meta={"fedprox_mu": 0.01})) == 0.01
    for meta in ({}, {"fedprox_mu": 0.0}, {"fedprox_mu": True}, {"fedprox_mu": float("nan")}):
        with pytest.raises(ValueError, match="fedprox_mu"):
            get_fedprox_mu(FLModel(meta=meta))
