"""Aggregation from object storage: 8 sites' updates of a 25M-parameter float32 model in an
S3-compatible store, read by a worker through ``jobs.storage`` and averaged by ``fedavg()``.

The store is moto's standalone server on this machine (``moto_server``, the one the tests
use; no other S3 server installs here), reached over HTTP by the real boto3 client, so the
figures are the client's and that server's, on two shared cores. Steps, each timed:

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
over what it was before, beside the model's size.

    .venv/bin/python bench/object_storage.py
    .venv/bin/python bench/object_storage.py --endpoint http://127.0.0.1:4569   # another server
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib
from benchlib import md_table, proc_status_kib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.object_store: the server the tests start

from tests.object_store import CREDENTIALS, s3_client, s3_server  # noqa: E402

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


def timed(step: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, extra anonymous MB at the peak, result) of ``step``."""
    with AnonPeak() as memory:
        started = time.perf_counter()
        result = step()
        seconds = time.perf_counter() - started
    return seconds, memory.extra_mb, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--endpoint",
        help="an S3-compatible server that is running already (its credentials in "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY); default: moto_server, started here",
    )
    args = parser.parse_args()
    benchlib.print_header(
        f"Aggregation from object storage: {SITES} sites × {benchlib.numel(SHAPES):,} float32 "
        "parameters",
        f"{args.endpoint or 'moto_server'} over HTTP on this machine, boto3 through "
        f"jobs.storage; {SITES * MODEL_BYTES / 1e9:.1f} GB of updates, a "
        f"{MODEL_BYTES / 1e6:.0f} MB model",
    )
    with tempfile.TemporaryDirectory(prefix="object-storage-bench-") as tmp:
        work = Path(tmp)
        server = (
            contextlib.nullcontext(args.endpoint) if args.endpoint else s3_server(work / "moto.log")
        )
        with server as endpoint:
            if not args.endpoint:
                os.environ.update(CREDENTIALS)
            os.environ.update(
                {
                    "DJANGO_SETTINGS_MODULE": "fedportal.settings.base",
                    "FEDPORTAL_DEV": "1",
                    "FEDPORTAL_DATA_DIR": str(work / "data"),
                    "FEDPORTAL_S3_BUCKET": BUCKET,
                    "FEDPORTAL_S3_ENDPOINT_URL": endpoint,
                    "FEDPORTAL_STORAGE_CACHE_DIR": str(work / "cache"),
                }
            )
            if args.endpoint:
                import boto3

                client: Any = boto3.client("s3", endpoint_url=endpoint)
            else:
                client = s3_client(endpoint)
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=BUCKET)
            import django

            django.setup()
            rows = run(work)
    print(
        md_table(
            ["step", "seconds", "GB/s", "extra memory (MB)", "× model"],
            [
                (
                    name,
                    f"{seconds:.2f}",
                    f"{SITES * MODEL_BYTES / 1e9 / seconds:.2f}",
                    f"{extra:.0f}",
                    f"{extra * 1e6 / MODEL_BYTES:.2f}",
                )
                for name, seconds, extra in rows
            ],
        )
    )


def run(work: Path) -> list[tuple[str, float, float]]:
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

    rows = []
    seconds, extra, _ = timed(upload)
    rows.append(("upload (publish, multipart)", seconds, extra))
    seconds, extra, paths = timed(download)
    rows.append(("download (local_path, ranged GETs)", seconds, extra))
    download_seconds, download_extra = seconds, extra
    seconds, extra, _ = timed(lambda: average(paths))
    rows.append(("fedavg over the local copies", seconds, extra))
    rows.append(
        ("download + fedavg (the round)", download_seconds + seconds, max(download_extra, extra))
    )
    seconds, extra, _ = timed(lambda: average(download()))
    rows.append(("again: copies current, + fedavg", seconds, extra))
    return rows


if __name__ == "__main__":
    main()
