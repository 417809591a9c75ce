"""Where an aggregation reads tensors from, one chunk at a time.

Aggregation walks each tensor in chunks of about a megabyte of elements and reads the same
chunk from every site before moving on, so its memory is one output model plus a chunk
buffer per site, however many sites there are and however large the model is. A site's
update may be in memory (``MemoryTensorSource``) or in a safetensors file on disk
(``FileTensorSource``, read with ``readinto`` rather than mapped, so pages already folded
are not kept resident by this process).

A source's ``specs()`` and ``read()`` are the params only. The tensors an update carries in its
meta (SCAFFOLD's control variates, stored under reserved names in the same file, see
``client_agent.wire``) are loaded whole, one meta key at a time, with ``meta_tensors(key)``.
"""

from __future__ import annotations

import io
import math
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from client_agent.wire import WireFormatError, all_finite, read_model_header, torch_dtypes

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

    def meta_tensor_keys(self) -> list[str]:
        """The meta keys the source holds tensors for."""
        ...

    def meta_tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors of ``meta[key]`` by name, loaded whole; ``{}`` when the source has none.

        Raises ``WireFormatError`` naming the tensor when a floating value is NaN or Inf.
        """
        ...

    def close(self) -> None: ...


_DTYPE_NAMES = {dtype: name for name, dtype in torch_dtypes().items()}


def _check_finite(tensor: torch.Tensor, where: str) -> None:
    """Raise ``WireFormatError`` naming ``where`` unless every value of ``tensor`` is finite,
    by the rule every update's params are checked with (``client_agent.wire.all_finite``)."""
    flat = tensor.detach().reshape(-1)
    # numpy sees the same memory; half precision as its bits (numpy has no bfloat16).
    raw = flat.view(torch.int16) if flat.element_size() == 2 else flat
    if not all_finite(raw.cpu().numpy(), _DTYPE_NAMES[tensor.dtype]):
        bad = "NaN" if bool(torch.isnan(flat).any()) else "Inf"
        raise WireFormatError(f"{where} holds {bad} values")


def _check_meta_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"meta_tensors(key): key must be a string, got {type(key).__name__}")
    return key


class MemoryTensorSource:
    """Tensors already in memory (a ``state_dict``); reads are views, no copies.

    ``meta_tensors`` maps a meta key to its tensors (``FLModel.meta[key]`` when it is a mapping
    of names to tensors).
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        meta_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        self._flat = {name: t.detach().reshape(-1) for name, t in params.items()}
        self._specs = {name: (t.dtype, tuple(t.shape)) for name, t in params.items()}
        self._meta: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensors in (meta_tensors or {}).items():
            if not isinstance(key, str) or not isinstance(tensors, Mapping):
                raise TypeError(
                    f"meta_tensors must map meta keys to mappings of name to tensor, got "
                    f"{key!r}: {type(tensors).__name__}"
                )
            for name, tensor in tensors.items():
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(
                        f"meta_tensors[{key!r}][{name!r}] must be a torch.Tensor, "
                        f"got {type(tensor).__name__}"
                    )
            self._meta[key] = {name: t.detach() for name, t in tensors.items()}

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        return self._flat[name][start:stop]

    def meta_tensor_keys(self) -> list[str]:
        return list(self._meta)

    def meta_tensors(self, key: str) -> dict[str, torch.Tensor]:
        tensors = self._meta.get(_check_meta_key(key), {})
        for name, tensor in tensors.items():
            _check_finite(tensor, f"meta tensor {name!r} of {key!r}")
        return dict(tensors)

    def close(self) -> None:
        pass


class FileTensorSource:
    """A safetensors file, checked on open (see :func:`client_agent.wire.read_model_header`)."""

    needs_buffer = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        header = read_model_header(self.path)
        self.metadata = header.metadata
        # read_model_header checked that the bytes match each shape and that tensors do not
        # overlap, reserved (meta) names included.
        self._specs: dict[str, TensorSpec] = {}
        self._offsets: dict[str, int] = {}
        for name, info in header.params.items():
            self._specs[name] = (torch_dtypes()[info["dtype"]], tuple(info["shape"]))
            self._offsets[name] = header.data_start + info["data_offsets"][0]
        self._meta: dict[str, dict[str, tuple[TensorSpec, int]]] = {
            key: {
                name: (
                    (torch_dtypes()[info["dtype"]], tuple(info["shape"])),
                    header.data_start + info["data_offsets"][0],
                )
                for name, info in tensors.items()
            }
            for key, tensors in header.meta_tensors.items()
        }
        self._fh: io.BufferedReader | None = None

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def meta_tensor_keys(self) -> list[str]:
        return list(self._meta)

    def read(self, name: str, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        dtype, _ = self._specs[name]
        count = stop - start
        if buffer is None or buffer.numel() < count or buffer.dtype != dtype:
            buffer = torch.empty(count, dtype=dtype)
        out = buffer[:count]
        self._read_into(out, self._offsets[name] + start * out.element_size(), name)
        return out

    def meta_tensors(self, key: str) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, ((dtype, shape), offset) in self._meta.get(_check_meta_key(key), {}).items():
            out = torch.empty(math.prod(shape), dtype=dtype)
            self._read_into(out, offset, name)
            _check_finite(out, f"{self.path.name}: meta tensor {name!r} of {key!r}")
            tensors[name] = out.reshape(shape)
        return tensors

    def _read_into(self, out: torch.Tensor, offset: int, name: str) -> None:
        """Fill the 1-D tensor ``out`` with the file's bytes from ``offset``."""
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        self._fh.seek(offset)
        got = self._fh.readinto(out.view(torch.uint8).numpy().data)
        if got != out.numel() * out.element_size():
            raise OSError(f"{self.path.name}: short read of tensor {name!r}")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class SubsetTensorSource:
    """Some of another source's params, by name (the rest hidden): what a workflow folds
    when ``exclude_vars`` keeps tensors out of aggregation. Meta tensors pass through."""

    def __init__(self, source: TensorSource, names: Iterable[str]) -> None:
        self._source = source
        wanted = set(names)
        self._specs = {n: spec for n, spec in source.specs().items() if n in wanted}

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        if name not in self._specs:
            raise KeyError(name)
        return self._source.read(name, start, stop, buffer)

    def meta_tensor_keys(self) -> list[str]:
        return self._source.meta_tensor_keys()

    def meta_tensors(self, key: str) -> dict[str, torch.Tensor]:
        return self._source.meta_tensors(key)

    def close(self) -> None:
        pass  # the whole source is its owner's to close


class PrefixedTensorSource:
    """The params of another source whose names start with ``prefix``, named without it:
    one model of several packed into one file (``"server_1/numpy_key"`` read as
    ``"numpy_key"``). Meta tensors are not carried."""

    def __init__(self, source: TensorSource, prefix: str) -> None:
        self._source = source
        self._prefix = prefix
        self._specs = {
            name[len(prefix) :]: spec
            for name, spec in source.specs().items()
            if name.startswith(prefix) and len(name) > len(prefix)
        }

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        if name not in self._specs:
            raise KeyError(name)
        return self._source.read(self._prefix + name, start, stop, buffer)

    def meta_tensor_keys(self) -> list[str]:
        return []

    def meta_tensors(self, key: str) -> dict[str, torch.Tensor]:
        return {}

    def close(self) -> None:
        pass  # the whole source is its owner's to close


class UnchangedFillSource:
    """A site's update with the tensors its privacy policy withheld read as *no change from
    this site*: the global model's values in a FULL update, zeros in a DIFF. Every aggregator
    then folds it like any other update, and a withheld tensor moves only by what the other
    sites sent."""

    def __init__(
        self, source: TensorSource, base: TensorSource, withheld: Iterable[str], *, diff: bool
    ) -> None:
        self._source = source
        self._base = base
        self._withheld = set(withheld)
        self._diff = diff
        base_specs = base.specs()
        self._specs = {
            **source.specs(),
            **{n: base_specs[n] for n in self._withheld if n in base_specs},
        }

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        if name not in self._withheld:
            return self._source.read(name, start, stop, buffer)
        if not self._diff:
            return self._base.read(name, start, stop, buffer)
        dtype, _ = self._specs[name]
        count = stop - start
        if buffer is None or buffer.numel() < count or buffer.dtype != dtype:
            return torch.zeros(count, dtype=dtype)
        return buffer[:count].zero_()

    def meta_tensor_keys(self) -> list[str]:
        return self._source.meta_tensor_keys()

    def meta_tensors(self, key: str) -> dict[str, torch.Tensor]:
        return self._source.meta_tensors(key)

    def close(self) -> None:
        self._source.close()  # the base is the driver's to close


def as_source(params: Mapping[str, torch.Tensor] | TensorSource) -> TensorSource:
    """``params`` as a :class:`TensorSource` (a ``state_dict`` is wrapped, not copied)."""
    if isinstance(params, Mapping):
        return MemoryTensorSource(params)
    return params


def tensors_of(source: TensorSource) -> dict[str, torch.Tensor]:
    """Every param of ``source``, read whole (a model's worth of memory)."""
    tensors = {}
    for name, (dtype, shape) in source.specs().items():
        numel = math.prod(shape)
        tensors[name] = source.read(name, 0, numel, torch.empty(numel, dtype=dtype)).reshape(shape)
    return tensors


def write_source(source: TensorSource, path: Path) -> Path:
    """``source`` as a model file at ``path``, whole or not at all (a temporary file renamed):
    a file source's file copied as it is, any other source's params written."""
    if not isinstance(source, FileTensorSource):
        from client_agent.wire import save_state_dict

        return save_state_dict(path, tensors_of(source))
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    shutil.copyfile(source.path, partial)
    os.replace(partial, path)
    return path
