"""A protected update as it travels: a safetensors file like any update, whose only tensor is
the masked or encrypted bytes (``uint8``), with the ``FLModel`` fields in its metadata as
usual: the params type, the metrics, and in ``meta`` the site's weight
(``NUM_STEPS_CURRENT_ROUND``) and its privacy report. The portal's upload path, size limit,
digest check and wire log treat it as any other update; only the check differs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from client_agent.fl_model import FLModel, ParamsType
from client_agent.secagg.session import Roster, SumsBeforeFinish
from client_agent.wire import WireFormatError, model_fields, read_model_header, write_model_file

PROTECTED_TENSOR = "fedportal.protected"


def write_protected(
    path: str | os.PathLike[str],
    data: bytes | memoryview,
    *,
    params_type: str,
    metrics: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """The protected ``data`` as an update file (atomic write)."""
    import torch

    array = np.frombuffer(data, dtype=np.uint8)
    if not array.flags.writeable:  # bytes (an HE upload): torch wants memory it may write
        array = array.copy()
    tensor = torch.from_numpy(array)  # a view: a masked 25M vector is not copied again
    model = FLModel(
        params_type=ParamsType(params_type),
        params={PROTECTED_TENSOR: tensor},
        metrics=metrics,
        meta=meta,
    )
    return write_model_file(path, model)


@dataclass(frozen=True)
class ProtectedUpload:
    """An uploaded protected update: its FLModel fields, and where its bytes lie."""

    fields: dict[str, Any]
    offset: int
    size: int

    def open(self, path: str | os.PathLike[str]) -> BinaryIO:
        """The file, positioned at the protected bytes (which run to its end)."""
        stream = open(path, "rb")  # noqa: SIM115 - the caller closes it
        stream.seek(self.offset)
        return stream


def read_protected(path: str | os.PathLike[str]) -> ProtectedUpload:
    """The header of a protected update; :class:`WireFormatError` when the file is not one
    (a plain model sent to a protected round, say)."""
    header = read_model_header(path)
    name = Path(path).name
    if set(header.params) != {PROTECTED_TENSOR} or header.meta_tensors:
        raise WireFormatError(
            f"{name}: a protected round takes one tensor, {PROTECTED_TENSOR!r} (the masked or "
            f"encrypted update); got {sorted(header.params)[:5]}"
        )
    entry = header.params[PROTECTED_TENSOR]
    if entry["dtype"] != "U8" or len(entry["shape"]) != 1:
        raise WireFormatError(
            f"{name}: {PROTECTED_TENSOR!r} must be a 1-D uint8 tensor, got {entry['dtype']} "
            f"{entry['shape']}"
        )
    start, stop = entry["data_offsets"]
    if header.data_start + stop != os.path.getsize(path):
        raise WireFormatError(f"{name}: bytes after the protected tensor")
    return ProtectedUpload(
        fields=model_fields(header.metadata, name),
        offset=header.data_start + start,
        size=stop - start,
    )


def sum_uploads(
    server: SumsBeforeFinish,
    roster: Roster,
    uploads: Sequence[tuple[str, Path]],
    shares: Mapping[str, Mapping[str, Any]],
    out: Path,
) -> None:
    """The protected sum of the uploads in these files (site, path), read in pieces from all
    of them at once, written to ``out`` by atomic rename (through ``out`` with ``.tmp`` for
    its suffix): a re-run after a crash writes the same bytes."""
    streams: list[tuple[str, BinaryIO]] = []
    try:
        for site, path in uploads:
            streams.append((site, read_protected(path).open(path)))
        tmp = out.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            server.total(roster, streams, shares, fh)
        tmp.replace(out)
    finally:
        for _, stream in streams:
            stream.close()


def protected_arrays(paths: Mapping[str, str | os.PathLike[str]]) -> dict[str, np.ndarray]:
    """The protected bytes of each update file (site → path) as a read-only memory map
    (``uint8``): nothing is read until it is used, and then straight from the page cache."""
    arrays: dict[str, np.ndarray] = {}
    for site, path in paths.items():
        upload = read_protected(path)
        arrays[site] = np.memmap(
            path, dtype=np.uint8, mode="r", offset=upload.offset, shape=(upload.size,)
        )
    return arrays


def protected_bytes(path: str | os.PathLike[str]) -> bytes:
    """The protected bytes of an update file, whole (SimEnv and tests)."""
    upload = read_protected(path)
    with upload.open(path) as stream:
        return bytes(stream.read(upload.size))


__all__ = [
    "PROTECTED_TENSOR",
    "ProtectedUpload",
    "protected_arrays",
    "protected_bytes",
    "read_protected",
    "sum_uploads",
    "write_protected",
]
