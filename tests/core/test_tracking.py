"""Experiment tracking: NVFlare's writers (``client_agent.tracking``) send what NVFlare's send,
``add_experiment_tracking`` checks its arguments, and SimEnv's trackers write real TensorBoard
event files and MLflow runs that TensorBoard's and MLflow's own readers read back exactly.

Values are chosen exact in float32 (TensorBoard stores scalars as float32), so the read-back
is compared with ``==``.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
    EventAccumulator,
)

from client_agent.fl_model import FLModel, ParamsType
from client_agent.runtime import TASK_TRAIN, ScriptProcess, Task
from client_agent.wire import write_model_file
from jobs.envs import SimEnv
from jobs.recipes import FedAvgRecipe, add_experiment_tracking
from jobs.tracking import (
    Point,
    Tracking,
    TrackingConfigError,
    file_store_uri,
    open_tracking,
    write_mlflow,
    write_tensorboard,
)

# --------------------------------------------------------------------------------------------
# The writers' records, as the runtime receives them
# --------------------------------------------------------------------------------------------

WRITER_SCRIPT = """
import client_agent.api as flare
from client_agent.analytics import AnalyticsDataType
from client_agent.tracking import MLflowWriter, SummaryWriter, WandBWriter

flare.init()
model = flare.receive()
tb, ml, wb = SummaryWriter(), MLflowWriter(), WandBWriter()
tb.add_scalar("loss", 0.5, global_step=3)
tb.add_scalars("lr", {"a": 1.0, "b": 2.0}, global_step=4)
ml.log_metric("acc", 0.75, step=5)
ml.log_metrics({"m1": 1.0, "m2": 2.0}, step=6)
ml.log_param("optimizer", "sgd")
ml.log_params({"momentum": 0.5, "layers": [64, 32]})
ml.log_text("hello", "notes/readme.txt")
ml.set_tag("team", "blue")
ml.set_tags({"phase": "trial"})
wb.log({"w": 0.25}, step=7)
flare.log("plain", 1.5)
flare.send(flare.FLModel(params=model.params))
"""


def _run_one_task(tmp: Path, body: str) -> list[dict[str, Any]]:
    app = tmp / "app"
    app.mkdir()
    script = app / "client.py"
    script.write_text(textwrap.dedent(body).lstrip())
    model_path = write_model_file(
        tmp / "global.safetensors",
        FLModel(params={"w": torch.zeros(2)}, params_type=ParamsType.FULL),
    )
    proc = ScriptProcess(
        script=script,
        args=[],
        site_name="site-1",
        job_id="writers-job",
        workdir=tmp / "work",
        log_path=tmp / "log.txt",
        connect_timeout=60,
    )
    frames: list[dict[str, Any]] = []
    proc.start()
    try:
        task = Task(
            task_id="writers-job:2:site-1",
            task_name=TASK_TRAIN,
            model_path=str(model_path),
            result_path=str(tmp / "result.safetensors"),
            current_round=2,
            total_rounds=3,
        )
        proc.run_task(task, on_log=frames.append, timeout=60)
    finally:
        proc.stop(grace=30)
    return frames


def test_writers_send_nvflare_data_types_keys_steps_and_writer_names(tmp_path: Path) -> None:
    frames = _run_one_task(tmp_path, WRITER_SCRIPT)

    sent = [
        (f["data_type"], f["key"], f["value"], f["step"], f["writer"], f["kwargs"]) for f in frames
    ]
    tb, ml, wb = "TORCH_TENSORBOARD", "MLFLOW", "WEIGHTS_AND_BIASES"
    assert sent == [
        ("SCALAR", "loss", 0.5, 3, tb, {}),
        ("SCALARS", "lr", {"a": 1.0, "b": 2.0}, 4, tb, {}),
        ("METRIC", "acc", 0.75, 5, ml, {}),
        ("METRICS", "metrics", {"m1": 1.0, "m2": 2.0}, 6, ml, {}),
        ("PARAMETER", "optimizer", "sgd", None, ml, {}),
        # MLflow string-ifies what is not a string, number or bool; so does the writer.
        ("PARAMETERS", "params", {"momentum": 0.5, "layers": "[64, 32]"}, None, ml, {}),
        ("TEXT", "text", "hello", None, ml, {"path": "notes/readme.txt"}),
        ("TAG", "team", "blue", None, ml, {}),
        ("TAGS", "tags", {"phase": "trial"}, None, ml, {}),
        ("METRICS", "metrics", {"w": 0.25}, 7, wb, {}),
        ("SCALAR", "plain", 1.5, None, None, {}),
    ]
    assert {f["round"] for f in frames} == {2}
    # The numbers reach the run's metrics: SCALARS as <tag>/<name>, METRICS by name.
    points = [p for f in frames for p in f["points"]]
    assert points == [
        ("loss", 0.5),
        ("lr/a", 1.0),
        ("lr/b", 2.0),
        ("acc", 0.75),
        ("m1", 1.0),
        ("m2", 2.0),
        ("w", 0.25),
        ("plain", 1.5),
    ]


def test_a_writer_given_a_context_says_there_is_only_one() -> None:
    from client_agent.tracking import SummaryWriter

    with pytest.raises(TypeError, match="ctx"):
        SummaryWriter(ctx=object())


# --------------------------------------------------------------------------------------------
# add_experiment_tracking's arguments
# --------------------------------------------------------------------------------------------


def _recipe(tmp_path: Path) -> FedAvgRecipe:
    app = tmp_path / "app"
    app.mkdir(exist_ok=True)
    (app / "client.py").write_text("print('unused')\n")
    return FedAvgRecipe(
        name="tracked",
        min_clients=2,
        num_rounds=1,
        model={"w": torch.zeros(2)},
        train_script=str(app / "client.py"),
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tracking_type": "neptune"}, ValueError, "tracking_type must be one of"),
        ({"tracking_type": "wandb"}, ValueError, "wandb package.*offline"),
        (
            {"tracking_type": "tensorboard", "clients": ["site-1"]},
            ValueError,
            "clients is only used for client-side tracking",
        ),
        (
            {"tracking_type": "mlflow", "client_side": False, "server_side": False},
            ValueError,
            "at least one of them must be True",
        ),
        (
            {"tracking_type": "mlflow", "client_side": True, "clients": []},
            ValueError,
            "clients must not be empty",
        ),
        (
            {"tracking_type": "mlflow", "client_side": True, "clients": "site-1"},
            TypeError,
            "clients must be a list",
        ),
        (
            {"tracking_type": "mlflow", "client_side": True, "clients": ["../x"]},
            ValueError,
            "are not site names",
        ),
        (
            {"tracking_type": "mlflow", "tracking_config": {"kw_args": {"experiment": "x"}}},
            ValueError,
            r"\['kw_args'\]: unknown keys \['experiment'\]",
        ),
        (
            {"tracking_type": "mlflow", "tracking_config": {"kw_args": {"run_tags": "x"}}},
            ValueError,
            "run_tags must be a dict",
        ),
        (
            {"tracking_type": "tensorboard", "tracking_config": {"tb_folder": "../out"}},
            ValueError,
            r"\['tb_folder'\] must be a relative folder",
        ),
        (
            {"tracking_type": "tensorboard", "tracking_config": {"tracking_uri": "x"}},
            ValueError,
            "unknown keys",
        ),
        ({"tracking_type": "mlflow", "server_side": "yes"}, TypeError, "server_side must be"),
    ],
)
def test_add_experiment_tracking_refuses_bad_arguments_at_once(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    recipe = _recipe(tmp_path)

    with pytest.raises(error, match=message):
        add_experiment_tracking(recipe, **kwargs)
    assert recipe.experiment_tracking == []


def test_add_experiment_tracking_puts_the_tracker_in_the_job_spec(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    config = {"kw_args": {"experiment_name": "exp"}}
    add_experiment_tracking(recipe, "mlflow", config, client_side=True, clients=["site-2"])
    config["kw_args"]["experiment_name"] = "changed later"

    spec = json.loads((recipe.export(tmp_path / "bundle") / "job.json").read_text())

    assert spec["experiment_tracking"] == [
        {
            "tracking_type": "mlflow",
            "tracking_config": {"kw_args": {"experiment_name": "exp"}},
            "client_side": True,
            "server_side": True,
            "clients": ["site-2"],
        }
    ]


# --------------------------------------------------------------------------------------------
# SimEnv: every data type into TensorBoard and MLflow, read back by their own readers
# --------------------------------------------------------------------------------------------

TRACKED_CLIENT = """
import client_agent.api as flare
from client_agent.analytics import AnalyticsDataType
from client_agent.tracking import MLflowWriter, SummaryWriter, WandBWriter

flare.init()
site = flare.get_site_name()
n = int(site.rsplit("-", 1)[1])
tb, ml, wb = SummaryWriter(), MLflowWriter(), WandBWriter()
while flare.is_running():
    model = flare.receive()
    r = model.current_round
    for step in range(2):
        tb.add_scalar("loss", n + r + step / 4, global_step=10 * r + step)
    tb.add_scalars("lr", {"a": n * 1.0, "b": n + 0.5}, global_step=r)
    ml.log_metric("acc", n / 2 + r, step=r)
    ml.log_metrics({"m1": n + 0.25, "m2": n + 0.75}, step=r)
    wb.log({"w": n * 4.0 + r}, step=r)
    flare.log("plain", n + 0.5 * r)  # no step: written at the round's number
    if r == 0:
        ml.log_param("optimizer", "sgd")
        ml.log_params({"momentum": n / 4, "nesterov": True})
        ml.set_tag("team", f"team-{n}")
        ml.set_tags({"phase": "trial"})
        ml.log_text(f"notes of {site}", "notes/readme.txt")
        flare.log("summary", f"hello from {site}", AnalyticsDataType.TEXT)
        ml.set_tag("site", "impostor")  # refused: the run's identity is the server's
    flare.send(flare.FLModel(params=model.params, metrics={"accuracy": float(n + r)},
                             meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""

SITES = ("site-1", "site-2")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("tracked")
    app = tmp / "app"
    app.mkdir()
    (app / "client.py").write_text(textwrap.dedent(TRACKED_CLIENT).lstrip())
    recipe = FedAvgRecipe(
        name="tracked",
        min_clients=2,
        num_rounds=2,
        model={"w": torch.zeros(2)},
        train_script=str(app / "client.py"),
    )
    add_experiment_tracking(recipe, "tensorboard")
    add_experiment_tracking(
        recipe,
        "mlflow",
        {"kw_args": {"experiment_name": "tracked-exp", "run_tags": {"owner": "tests"}}},
    )
    add_experiment_tracking(
        recipe, "tensorboard", client_side=True, server_side=False, clients=["site-2"]
    )
    add_experiment_tracking(
        recipe, "mlflow", client_side=True, server_side=False, clients=["site-1"]
    )
    run = recipe.execute(SimEnv(clients=list(SITES), workspace=tmp / "ws", show_progress=False))
    assert run.status.value == "COMPLETED", run.error
    return run


def _accumulator(folder: Path) -> EventAccumulator:
    assert folder.is_dir(), folder
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in acc.Scalars(tag)]


def _text(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


@pytest.mark.parametrize("site", SITES)
def test_tensorboard_reads_back_each_sites_exact_scalars(tracked_run: Any, site: str) -> None:
    n = int(site.rsplit("-", 1)[1])
    root = tracked_run.workspace / "server" / "tb_events"
    acc = _accumulator(root / site)

    assert _scalars(acc, "loss") == [
        (10 * r + step, n + r + step / 4) for r in range(2) for step in range(2)
    ]
    assert _scalars(acc, "acc") == [(r, n / 2 + r) for r in range(2)]
    assert _scalars(acc, "m1") == [(r, n + 0.25) for r in range(2)]
    assert _scalars(acc, "m2") == [(r, n + 0.75) for r in range(2)]
    assert _scalars(acc, "w") == [(r, n * 4.0 + r) for r in range(2)]
    assert _scalars(acc, "plain") == [(r, n + 0.5 * r) for r in range(2)]
    # Parameters: numbers (and bools) as scalars, strings as text, NVFlare's TensorBoard rule.
    assert _scalars(acc, "momentum") == [(0, n / 4)]
    assert _scalars(acc, "nesterov") == [(0, 1.0)]
    assert _text(acc, "optimizer") == [(0, "sgd")]
    assert _text(acc, "summary") == [(0, f"hello from {site}")]
    # add_scalars: a run per name beside the site's, each with the parent tag.
    assert _scalars(_accumulator(root / site / "lr_a"), "lr") == [(0, n * 1.0), (1, n * 1.0)]
    assert _scalars(_accumulator(root / site / "lr_b"), "lr") == [(0, n + 0.5), (1, n + 0.5)]


def test_tensorboard_reads_back_the_rounds_aggregates(tracked_run: Any) -> None:
    acc = _accumulator(tracked_run.workspace / "server" / "tb_events" / "aggregate")

    # FedAvg's weighted mean of the sites' accuracy n + r (equal weights): 1.5 + r.
    assert _scalars(acc, "accuracy") == [(0, 1.5), (1, 2.5)]


def test_client_side_tensorboard_keeps_only_the_chosen_sites_own_records(
    tracked_run: Any,
) -> None:
    sites = tracked_run.workspace / "sites"
    acc = _accumulator(sites / "site-2" / "tb_events")

    assert _scalars(acc, "acc") == [(0, 1.0), (1, 2.0)]
    assert not (sites / "site-1" / "tb_events").exists()


def test_client_side_mlflow_keeps_the_chosen_sites_run_in_its_own_store(
    tracked_run: Any,
) -> None:
    sites = tracked_run.workspace / "sites"
    client = MlflowClient(tracking_uri=file_store_uri(sites / "site-1" / "mlruns"))
    experiment = client.get_experiment_by_name("tracked")  # the job's name by default
    assert experiment is not None

    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["site"] == "site-1"
    assert _history(client, run.info.run_id, "acc") == [(0, 0.5), (1, 1.5)]
    assert not (sites / "site-2" / "mlruns").exists()


def _mlflow_runs(run: Any) -> tuple[MlflowClient, dict[str, Any]]:
    client = MlflowClient(tracking_uri=file_store_uri(run.workspace / "server" / "mlruns"))
    experiment = client.get_experiment_by_name("tracked-exp")
    assert experiment is not None
    found = client.search_runs([experiment.experiment_id])
    return client, {r.data.tags["site"]: r for r in found}


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_mlflow_has_one_finished_run_per_site_and_one_for_the_aggregates(
    tracked_run: Any,
) -> None:
    client, runs = _mlflow_runs(tracked_run)

    assert sorted(runs) == ["aggregate", "site-1", "site-2"]
    for site, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["job_id"] == tracked_run.job_id
        assert run.data.tags["job_name"] == "tracked"
        assert run.data.tags["owner"] == "tests"
        assert run.info.run_name == f"{site}-{tracked_run.job_id}-tracked"
    aggregate = runs["aggregate"].info.run_id
    assert _history(client, aggregate, "accuracy") == [(0, 1.5), (1, 2.5)]


@pytest.mark.parametrize("site", SITES)
def test_mlflow_reads_back_each_sites_metrics_params_tags_and_text(
    tracked_run: Any, site: str, tmp_path: Path
) -> None:
    n = int(site.rsplit("-", 1)[1])
    client, runs = _mlflow_runs(tracked_run)
    run = runs[site]
    run_id = run.info.run_id

    assert _history(client, run_id, "loss") == [
        (10 * r + step, n + r + step / 4) for r in range(2) for step in range(2)
    ]
    assert _history(client, run_id, "lr/a") == [(0, n * 1.0), (1, n * 1.0)]
    assert _history(client, run_id, "lr/b") == [(0, n + 0.5), (1, n + 0.5)]
    assert _history(client, run_id, "acc") == [(r, n / 2 + r) for r in range(2)]
    assert _history(client, run_id, "m2") == [(r, n + 0.75) for r in range(2)]
    assert _history(client, run_id, "w") == [(r, n * 4.0 + r) for r in range(2)]
    assert _history(client, run_id, "plain") == [(r, n + 0.5 * r) for r in range(2)]
    assert run.data.params == {"optimizer": "sgd", "momentum": str(n / 4), "nesterov": "True"}
    assert run.data.tags["team"] == f"team-{n}"
    assert run.data.tags["phase"] == "trial"
    assert run.data.tags["site"] == site  # the script's set_tag("site", …) was refused
    notes = Path(client.download_artifacts(run_id, "notes/readme.txt", str(tmp_path)))
    assert notes.read_text() == f"notes of {site}"
    summary = Path(client.download_artifacts(run_id, "summary.txt", str(tmp_path)))
    assert summary.read_text() == f"hello from {site}"


# --------------------------------------------------------------------------------------------
# Tracking itself: threads, bad records, open errors
# --------------------------------------------------------------------------------------------


def _frame(key: str, value: Any, data_type: str = "SCALAR", **extra: Any) -> dict[str, Any]:
    return {
        "type": "log",
        "key": key,
        "data_type": data_type,
        "value": value,
        "step": extra.get("step"),
        "round": extra.get("round"),
        "writer": None,
        "kwargs": extra.get("kwargs", {}),
    }


def _open(tmp_path: Path, *trackers: dict[str, Any]) -> Tracking:
    return open_tracking(
        list(trackers), workspace=tmp_path, job_name="unit", job_id="unit-1", sites=SITES
    )


def test_records_from_many_threads_all_arrive(tmp_path: Path) -> None:
    import threading

    tracking = _open(tmp_path, {"tracking_type": "tensorboard"})

    def site_logs(site: str) -> None:
        for step in range(200):
            tracking.site_record(site, _frame("loss", step / 2, step=step))

    threads = [threading.Thread(target=site_logs, args=(site,)) for site in SITES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tracking.close()

    for site in SITES:
        acc = _accumulator(tmp_path / "server" / "tb_events" / site)
        assert _scalars(acc, "loss") == [(step, step / 2) for step in range(200)]


def test_a_record_a_tracker_refuses_is_noted_and_the_others_still_arrive(tmp_path: Path) -> None:
    tracking = _open(tmp_path, {"tracking_type": "mlflow"})
    tracking.site_record("site-1", _frame("lr", 0.5, "PARAMETER"))
    tracking.site_record("site-1", _frame("lr", 0.25, "PARAMETER"))  # a param cannot change
    tracking.site_record("site-1", _frame("t", "x", "TEXT", kwargs={"path": "../escape.txt"}))
    tracking.site_record("site-1", _frame("loss", 1.5, round=0))
    # A name MLflow refuses costs only itself, not the batch it would have gone in.
    tracking.site_record("site-1", _frame("metrics", {"ok": 2.5, "bad?": 3.5}, "METRICS"))
    tracking.close()

    assert len(tracking.problems) == 3
    assert "escape.txt" in tracking.problems[1]
    assert "'bad?': MLflow takes letters" in tracking.problems[2]
    client = MlflowClient(tracking_uri=file_store_uri(tmp_path / "server" / "mlruns"))
    experiment = client.get_experiment_by_name("unit")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params == {"lr": "0.5"}
    assert _history(client, run.info.run_id, "loss") == [(0, 1.5)]
    assert set(run.data.metrics) == {"loss", "ok"}
    assert not (tmp_path / "server" / "escape.txt").exists()


def test_open_tracking_names_a_client_that_is_not_a_site(tmp_path: Path) -> None:
    tracker = {"tracking_type": "tensorboard", "client_side": True, "clients": ["site-9"]}

    with pytest.raises(TrackingConfigError, match=r"experiment_tracking\[0\]\.clients: no site"):
        _open(tmp_path, tracker)


# --------------------------------------------------------------------------------------------
# A finished job's stored points (what the portal exports)
# --------------------------------------------------------------------------------------------

POINTS = [
    Point(site="site-1", round=0, key="loss", value=0.5, step=3),
    Point(site="site-1", round=0, key="accuracy", value=0.25, step=None, source="result"),
    Point(site="site-2", round=1, key="loss", value=0.75, step=None),
    Point(site=None, round=0, key="accuracy", value=0.375, step=None, source="aggregate"),
]


def test_write_tensorboard_writes_stored_points_per_site_and_aggregate(tmp_path: Path) -> None:
    write_tensorboard(POINTS, tmp_path / "tb")

    assert _scalars(_accumulator(tmp_path / "tb" / "site-1"), "loss") == [(3, 0.5)]
    assert _scalars(_accumulator(tmp_path / "tb" / "site-1"), "result/accuracy") == [(0, 0.25)]
    assert _scalars(_accumulator(tmp_path / "tb" / "site-2"), "loss") == [(1, 0.75)]
    assert _scalars(_accumulator(tmp_path / "tb" / "aggregate"), "accuracy") == [(0, 0.375)]


def test_write_mlflow_writes_stored_points_as_runs(tmp_path: Path) -> None:
    uri = file_store_uri(tmp_path / "mlruns")
    write_mlflow(POINTS, uri, "exported", job_name="job", job_id="uid-1")

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("exported")
    assert experiment is not None
    runs = {r.data.tags["site"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["aggregate", "site-1", "site-2"]
    assert _history(client, runs["site-1"].info.run_id, "loss") == [(3, 0.5)]
    assert _history(client, runs["aggregate"].info.run_id, "accuracy") == [(0, 0.375)]
    assert runs["site-2"].data.tags["job_id"] == "uid-1"
