"""Where an aggregation reads tensors from, one chunk at a time.

Aggregation walks each tensor in chunks of about a megabyte of elements and reads the same
chunk from every site before moving on, so its memory is one output model plus a chunk
buffer per site, however many sites there are and however large the model is. A site's
update may be in memory (``MemoryTensorSource``) or in a safetensors file on disk
(``FileTensorSource``, read with ``readinto`` rather than mapped, so pages already folded
are not kept resident by this process).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from client_agent.wire import read_header, torch_dtypes

TensorSpec = tuple[torch.dtype, tuple[int, ...]]


class TensorSource(Protocol):
    def specs(self) -> dict[str, TensorSpec]:
        """Every tensor's dtype and shape, in the source's order."""
        ...

    def read(self, name: str, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor ``name``, as a 1-D tensor.

        ``buffer``, when given, is a 1-D tensor of the right dtype with at least
        ``stop - start`` elements that the source may fill and return a view of.
        """
        ...

    def close(self) -> None: ...


class MemoryTensorSource:
    """Tensors already in memory (a ``state_dict``); reads are views, no copies."""

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        self._flat = {name: t.detach().reshape(-1) for name, t in params.items()}
        self._specs = {name: (t.dtype, tuple(t.shape)) for name, t in params.items()}

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        return self._flat[name][start:stop]

    def close(self) -> None:
        pass


class FileTensorSource:
    """A safetensors file, checked on open (see :func:`client_agent.wire.read_header`)."""

    needs_buffer = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        header, self.metadata = read_header(self.path)
        with open(self.path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
        data_start = 8 + header_len
        self._specs: dict[str, TensorSpec] = {}
        self._offsets: dict[str, int] = {}
        for name, info in header.items():
            dtype = torch_dtypes()[info["dtype"]]
            shape = tuple(info["shape"])
            # read_header checked that the bytes match the shape and that tensors do not overlap.
            begin, _ = info["data_offsets"]
            self._specs[name] = (dtype, shape)
            self._offsets[name] = data_start + begin
        self._fh: io.BufferedReader | None = None

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        dtype, _ = self._specs[name]
        count = stop - start
        if buffer is None or buffer.numel() < count or buffer.dtype != dtype:
            buffer = torch.empty(count, dtype=dtype)
        out = buffer[:count]
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        itemsize = out.element_size()
        self._fh.seek(self._offsets[name] + start * itemsize)
        got = self._fh.readinto(out.view(torch.uint8).numpy().data)
        if got != count * itemsize:
            raise OSError(f"{self.path.name}: short read of tensor {name!r}")
        return out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
