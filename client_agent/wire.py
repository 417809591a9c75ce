"""Wire format: tensors travel as safetensors files, everything else as JSON.

Nothing here unpickles. A model file is a plain safetensors file whose ``__metadata__`` holds
one JSON document under :data:`METADATA_KEY` with the ``FLModel``'s other fields, so one file
carries a whole update (the same file later goes over HTTP to the portal unchanged). Control
messages between a client script and its runtime are length-prefixed JSON frames.

JSON cannot hold tensors, yet algorithms send some in ``FLModel.meta`` (SCAFFOLD's control
variates: ``meta["scaffold_c_diff"] = {param name: array}``). A meta value that is a non-empty
mapping of names to tensors or numpy arrays is therefore stored as tensors of the same file,
named ``__meta__/<key>/<name>`` (:data:`META_TENSOR_PREFIX`, which no parameter may start
with), and the JSON lists those keys under :data:`META_TENSOR_KEYS_FIELD`. Reading puts them
back into ``meta[key]`` as a dict of torch tensors; ``FLModel.params`` never holds them. A file
without meta tensors is written exactly as before.

Reading is checked before the safetensors library sees the bytes, so that a pickle, a
truncated file or garbage fails with a :class:`WireFormatError` that names the file and the
reason instead of a library panic.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError, safe_open

from client_agent import jsonlimits
from client_agent.fl_model import FLModel, ParamsType

# The frame functions live in client_agent.frames (no torch, for the agent); they are
# re-exported here, where the scripts' side and older callers look for them.
from client_agent.frames import MAX_FRAME_BYTES as MAX_FRAME_BYTES
from client_agent.frames import WireFormatError as WireFormatError
from client_agent.frames import decode_frame_body as decode_frame_body
from client_agent.frames import dumps as dumps
from client_agent.frames import encode_frame as encode_frame
from client_agent.frames import recv_frame as recv_frame
from client_agent.frames import send_frame as send_frame
from common.validators import is_int

if TYPE_CHECKING:
    import torch

METADATA_KEY = "fedportal.flmodel"
META_TENSOR_PREFIX = "__meta__/"
"""Tensors named ``__meta__/<key>/<name>`` hold ``FLModel.meta[key][name]``. ``write_model_file``
refuses a param whose name starts with it, so a parameter never passes for a meta tensor."""
META_TENSOR_KEYS_FIELD = "meta_tensor_keys"
"""The field of the JSON under :data:`METADATA_KEY` that lists the meta keys stored as tensors;
absent when there are none."""
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit

# The safetensors dtypes we accept, with their sizes in bytes; anything else is refused.
# Checking a file needs only these names, so the portal checks uploads without importing torch
# (~1 s at start-up).
DTYPE_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
SAFETENSORS_DTYPE_NAMES = tuple(DTYPE_ITEMSIZE)
# Half-precision floats as their bits: a value is NaN or Inf exactly when every exponent bit is
# set. numpy has no bfloat16, and its float16 arithmetic is emulated (20× slower than this).
_HALF_EXPONENT_MASK = {"F16": 0x7C00, "BF16": 0x7F80}
_NUMPY_FLOATS = {"F64": np.float64, "F32": np.float32}


@cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name → torch dtype, for the names we accept."""
    import torch  # only where tensors are made

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }


# --------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------


def to_tensor_dict(params: Mapping[str, Any], *, what: str = "params") -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors for saving; numpy arrays are converted.

    Tensors that share storage (tied weights) are cloned, because safetensors refuses shared
    storage and the receiver loads each name on its own anyway.
    """
    return _to_tensor_dict(params, what=what, seen=set())


def _to_tensor_dict(
    params: Mapping[str, Any], *, what: str, seen: set[tuple[int, int]]
) -> dict[str, torch.Tensor]:
    """:func:`to_tensor_dict`, cloning any tensor whose storage is in ``seen`` (which it extends),
    so that the params and the meta tensors of one file share no storage either."""
    import torch

    if not isinstance(params, Mapping):
        raise TypeError(f"{what} must be a mapping of name to tensor, got {type(params).__name__}")
    supported = tuple(torch_dtypes().values())
    out: dict[str, torch.Tensor] = {}
    for name, value in params.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: tensor names must be strings, got {name!r}")
        if isinstance(value, np.ndarray):
            # np.ascontiguousarray would turn a 0-dim array into shape (1,); copy keeps it.
            value = torch.from_numpy(value if value.flags.c_contiguous else value.copy())
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{what}[{name!r}] must be a torch.Tensor or numpy array, "
                f"got {type(value).__name__}"
            )
        if value.dtype not in supported:
            raise TypeError(
                f"{what}[{name!r}] has dtype {value.dtype}, which the wire format does not "
                f"carry (supported: {', '.join(str(d) for d in supported)})"
            )
        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if tensor.numel() and key in seen:
            tensor = tensor.clone()
        seen.add(key)
        out[name] = tensor
    return out


def meta_tensor_name(key: str, name: str) -> str:
    """The name in a model file of tensor ``name`` of ``FLModel.meta[key]``."""
    return f"{META_TENSOR_PREFIX}{key}/{name}"


def is_tensor_mapping(value: Any) -> bool:
    """Whether a meta value travels as tensors: a non-empty mapping whose every value is a torch
    tensor or a numpy array. (A mapping that mixes tensors with other values goes to JSON, where
    only one-element tensors become numbers, and anything larger is refused.)"""
    if not isinstance(value, Mapping) or not value:
        return False
    import torch

    return all(isinstance(v, torch.Tensor | np.ndarray) for v in value.values())


def _meta_tensors_to_save(
    meta: Mapping[str, Any], seen: set[tuple[int, int]]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of every meta value that travels as tensors, under their reserved names, and
    the keys they came from."""
    tensors: dict[str, torch.Tensor] = {}
    keys: list[str] = []
    for key, value in meta.items():
        if not is_tensor_mapping(value):
            continue
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(
                f"FLModel.meta key {key!r} holds tensors, so it must be a non-empty string "
                "without '/' (it becomes part of the tensors' names in the file)"
            )
        what = f"FLModel.meta[{key!r}]"
        for name, tensor in _to_tensor_dict(value, what=what, seen=seen).items():
            if not name:
                raise ValueError(f"{what}: tensor names must not be empty")
            tensors[meta_tensor_name(key, name)] = tensor
        keys.append(key)
    return tensors, keys


def write_model_file(path: str | os.PathLike[str], model: FLModel) -> Path:
    """Write ``model`` as one safetensors file, atomically (a reader never sees half a file).

    A meta value that is a non-empty mapping of names to tensors or numpy arrays is stored as
    tensors of the file (see the module's docstring); every other meta value must be JSON.
    """
    if not isinstance(model, FLModel):
        raise TypeError(f"expected an FLModel, got {type(model).__name__}")
    seen: set[tuple[int, int]] = set()
    tensors = _to_tensor_dict(model.params or {}, what="FLModel.params", seen=seen)
    reserved = sorted(name for name in tensors if name.startswith(META_TENSOR_PREFIX))
    if reserved:
        raise ValueError(
            f"FLModel.params[{reserved[0]!r}]: names starting with {META_TENSOR_PREFIX!r} are "
            "reserved for the tensors of FLModel.meta"
        )
    params_type = model.params_type or (ParamsType.FULL if tensors else None)
    meta = dict(model.meta or {})
    meta_tensors, meta_tensor_keys = _meta_tensors_to_save(meta, seen)
    for key in meta_tensor_keys:
        del meta[key]
    tensors.update(meta_tensors)
    fields: dict[str, Any] = {
        "params_type": params_type.value if isinstance(params_type, ParamsType) else None,
        "metrics": model.metrics,
        "meta": meta,
        "current_round": model.current_round,
        "total_rounds": model.total_rounds,
        "start_round": model.start_round,
    }
    if meta_tensor_keys:  # absent otherwise: a file without meta tensors is as it always was
        fields[META_TENSOR_KEYS_FIELD] = meta_tensor_keys
    try:
        header_json = dumps(fields)
    except TypeError as exc:
        raise TypeError(
            f"FLModel metrics/meta must be JSON values (or, for a meta value, a mapping of "
            f"names to tensors): {exc}"
        ) from None
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    from safetensors.torch import save_file  # imports torch

    save_file(tensors, str(tmp), metadata={METADATA_KEY: header_json})
    os.replace(tmp, path)
    return path


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tensor table (name → dtype, shape, data_offsets) and metadata, checked, no data read.

    The table is the file's own: meta tensors are in it under their reserved names
    (:func:`read_model_header` separates them from the params). Raises
    :class:`WireFormatError` for anything that is not a well-formed safetensors file with dtypes
    we accept, or whose reserved names are malformed.
    """
    header, metadata, _ = _read_checked_header(path)
    if any(name.startswith(META_TENSOR_PREFIX) for name in header):
        split_meta_tensors(header, metadata, Path(path).name)
    return header, metadata


@dataclass(frozen=True)
class ModelHeader:
    """A model file's checked header, with the params apart from the meta tensors."""

    params: dict[str, dict[str, Any]]
    """Parameter name → its entry in the safetensors table (dtype, shape, data_offsets)."""
    meta_tensors: dict[str, dict[str, dict[str, Any]]]
    """Meta key → tensor name (without the reserved prefix) → its entry in the table."""
    metadata: dict[str, str]
    data_start: int
    """Where the data begins in the file; ``data_offsets`` count from here."""


def read_model_header(path: str | os.PathLike[str]) -> ModelHeader:
    """:func:`read_header`, with the meta tensors told apart from the params."""
    header, metadata, data_start = _read_checked_header(path)
    params, meta_tensors = split_meta_tensors(header, metadata, Path(path).name)
    return ModelHeader(params, meta_tensors, metadata, data_start)


def _read_checked_header(
    path: str | os.PathLike[str],
) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """The tensor table, the metadata and where the data begins, with the layout checked."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise WireFormatError(f"{path.name}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise WireFormatError(
                    f"{path.name}: not a safetensors file (header length {header_len} does not "
                    f"fit in {size} bytes; a pickle or garbage?)"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise WireFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    header = _json_object(raw, f"{path.name}: not a safetensors file (header is not JSON)")
    if not isinstance(header, dict):
        raise WireFormatError(f"{path.name}: safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireFormatError(f"{path.name}: __metadata__ must map strings to strings")
    _check_layout(path.name, header, size - 8 - header_len)
    return header, metadata, 8 + header_len


def split_meta_tensors(
    header: Mapping[str, dict[str, Any]], metadata: Mapping[str, str], filename: str
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, dict[str, Any]]]]:
    """A checked tensor table split into the params' entries and each meta key's.

    Every reserved name must read ``__meta__/<key>/<name>`` with a key the metadata lists under
    :data:`META_TENSOR_KEYS_FIELD`, and every listed key must have a tensor; otherwise
    :class:`WireFormatError`.
    """
    params: dict[str, dict[str, Any]] = {}
    by_key: dict[str, dict[str, dict[str, Any]]] = {
        key: {} for key in _listed_meta_tensor_keys(metadata, filename)
    }
    for name, info in header.items():
        if not name.startswith(META_TENSOR_PREFIX):
            params[name] = info
            continue
        key, slash, tensor_name = name[len(META_TENSOR_PREFIX) :].partition("/")
        if not (key and slash and tensor_name):
            raise WireFormatError(
                f"{filename}: tensor {name!r} has a reserved name that does not read "
                f"'{META_TENSOR_PREFIX}<key>/<name>'"
            )
        if key not in by_key:
            raise WireFormatError(
                f"{filename}: tensor {name!r} belongs to meta key {key!r}, which the metadata "
                f"does not list in {META_TENSOR_KEYS_FIELD}"
            )
        by_key[key][tensor_name] = info
    for key, tensors in by_key.items():
        if not tensors:
            raise WireFormatError(
                f"{filename}: {META_TENSOR_KEYS_FIELD} lists meta key {key!r}, but the file "
                "holds no tensor of it"
            )
    return params, by_key


def _check_layout(filename: str, header: dict[str, Any], data_len: int) -> None:
    """Each tensor's bytes match its dtype and shape, and the tensors tile the data exactly.

    As the safetensors format requires (and its library checks on load): no two tensors share
    bytes, no byte is left over, none lies outside the file. Readers that seek to offsets
    themselves (aggregation) rely on it.
    """
    spans = []
    for name, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_NAMES:
            raise WireFormatError(f"{filename}: tensor {name!r} has unsupported dtype {dtype!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
            raise WireFormatError(f"{filename}: tensor {name!r} has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise WireFormatError(f"{filename}: tensor {name!r} lies outside the file")
        needed = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != needed:
            raise WireFormatError(
                f"{filename}: tensor {name!r} holds {offsets[1] - offsets[0]} bytes, its "
                f"shape {shape} of {dtype} needs {needed}"
            )
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            problem = "overlaps another tensor" if begin < end else "leaves a gap before it"
            raise WireFormatError(f"{filename}: tensor {name!r} {problem}")
        end = stop
    if end != data_len:
        raise WireFormatError(
            f"{filename}: {data_len - end} bytes after the last tensor belong to none"
        )


def _json_object(raw: bytes | str, error: str) -> Any:
    """Strict JSON (``client_agent.jsonlimits``): no NaN or Infinity (which Python's json takes
    by default), no nesting deep enough to exhaust the parser, no integer past Python's
    conversion limit. Anything else is a WireFormatError starting with ``error``."""
    try:
        return jsonlimits.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireFormatError(f"{error}: {exc}") from None


def all_finite(values: np.ndarray[Any, Any], dtype: str) -> bool:
    """Whether every value of a chunk of a floating tensor is finite (no NaN, no Inf).

    ``values`` holds the tensor's bytes as its numpy dtype, or as unsigned integers of the same
    width for the half-precision types (``F16``, ``BF16``) that numpy cannot compute in.
    Integer and bool tensors are always finite. The one rule for the initial model (checked in
    the portal, without torch) and for every update (``jobs.aggregation.check_update``).
    """
    mask = _HALF_EXPONENT_MASK.get(dtype)
    if mask is not None:
        bits = values.view(np.uint16)
        return not bool(np.any((bits & mask) == mask))
    if dtype in _NUMPY_FLOATS:
        return bool(np.isfinite(values).all())
    return True


def first_nonfinite_tensor(
    path: str | os.PathLike[str], *, chunk_bytes: int = 4 << 20
) -> str | None:
    """The name of the first floating tensor holding NaN or Inf in a checked model file, or
    None. Reads the file once, a chunk at a time (memory stays at ``chunk_bytes``)."""
    header, _ = read_header(path)
    with open(path, "rb") as fh:
        header_len = struct.unpack("<Q", fh.read(8))[0]
        data_start = 8 + header_len
        for name, info in header.items():
            dtype = info["dtype"]
            if dtype not in _HALF_EXPONENT_MASK and dtype not in _NUMPY_FLOATS:
                continue
            itemsize = DTYPE_ITEMSIZE[dtype]
            as_numpy = _NUMPY_FLOATS.get(dtype, np.uint16)
            begin, end = info["data_offsets"]
            step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
            for offset in range(begin, end, step):
                fh.seek(data_start + offset)
                raw = fh.read(min(step, end - offset))
                if not all_finite(np.frombuffer(raw, dtype=as_numpy), dtype):
                    return str(name)
    return None


def read_model_file(path: str | os.PathLike[str]) -> FLModel:
    """Load a model file written by :func:`write_model_file` (or any safetensors file).

    The tensors are backed by a copy-on-write map of the file, so several processes reading
    the same global model share its pages until they write to them. Meta tensors come back in
    ``meta[key]`` as a dict of torch tensors, never in ``params``.
    """
    header = read_model_header(path)
    fields = model_fields(header.metadata, Path(path).name)
    from safetensors.torch import load_file  # imports torch

    try:
        params = load_file(str(path))
    except SafetensorError as exc:
        raise WireFormatError(f"{Path(path).name}: invalid safetensors data: {exc}") from None
    meta = dict(fields["meta"])
    for key, names in header.meta_tensors.items():
        meta[key] = {name: params.pop(meta_tensor_name(key, name)) for name in names}
    fields["meta"] = meta
    return FLModel(params=params, **fields)


def model_fields(metadata: Mapping[str, str], filename: str) -> dict[str, Any]:
    """The checked ``FLModel`` fields (all but params) stored in a model file's metadata.

    ``meta`` holds the JSON meta values only; the meta values stored as tensors are read with
    the tensors (:func:`read_model_file`, ``FileTensorSource.meta_tensors``).
    """
    fields = _flmodel_json(metadata, filename)
    if fields is None:
        return {"params_type": None, "metrics": None, "meta": {}}
    params_type = fields.get("params_type")
    if params_type is not None and params_type not in (ParamsType.FULL, ParamsType.DIFF):
        raise WireFormatError(f"{filename}: params_type must be FULL or DIFF, got {params_type!r}")
    for name in ("metrics", "meta"):
        if not isinstance(fields.get(name) or {}, dict):
            raise WireFormatError(f"{filename}: {name} must be a JSON object")
    for name in ("current_round", "total_rounds", "start_round"):
        value = fields.get(name)
        if value is not None and not is_int(value):
            raise WireFormatError(f"{filename}: {name} must be an integer, got {value!r}")
    _meta_tensor_keys(fields, filename)
    return {
        "params_type": params_type,
        "metrics": fields.get("metrics"),
        "meta": fields.get("meta") or {},
        "current_round": fields.get("current_round"),
        "total_rounds": fields.get("total_rounds"),
        "start_round": fields.get("start_round", 0),
    }


def _flmodel_json(metadata: Mapping[str, str], filename: str) -> dict[str, Any] | None:
    """The JSON object under :data:`METADATA_KEY`, or None for a plain safetensors file."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    fields = _json_object(raw, f"{filename}: {METADATA_KEY} is not JSON")
    if not isinstance(fields, dict):
        raise WireFormatError(f"{filename}: {METADATA_KEY} must be a JSON object")
    return fields


def _listed_meta_tensor_keys(metadata: Mapping[str, str], filename: str) -> list[str]:
    fields = _flmodel_json(metadata, filename)
    return [] if fields is None else _meta_tensor_keys(fields, filename)


def _meta_tensor_keys(fields: Mapping[str, Any], filename: str) -> list[str]:
    """The checked list of meta keys stored as tensors: distinct non-empty strings without '/',
    none of them also a JSON meta value."""
    keys = fields.get(META_TENSOR_KEYS_FIELD)
    if keys is None:
        return []
    if not isinstance(keys, list):
        raise WireFormatError(f"{filename}: {META_TENSOR_KEYS_FIELD} must be a list of meta keys")
    json_meta = fields.get("meta")
    for key in keys:
        if not isinstance(key, str) or not key or "/" in key:
            raise WireFormatError(
                f"{filename}: {META_TENSOR_KEYS_FIELD} holds {key!r}, not a non-empty string "
                "without '/'"
            )
        if isinstance(json_meta, dict) and key in json_meta:
            raise WireFormatError(
                f"{filename}: meta key {key!r} is both a JSON value and a set of tensors"
            )
    if len(set(keys)) != len(keys):
        raise WireFormatError(f"{filename}: {META_TENSOR_KEYS_FIELD} lists a meta key twice")
    return list(keys)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Just the tensors of a model file, checked first."""
    model = read_model_file(path)
    return dict(model.params or {})


def save_state_dict(path: str | os.PathLike[str], params: Mapping[str, Any]) -> Path:
    """Write plain weights (a FULL model with no metrics) as a model file."""
    return write_model_file(path, FLModel(params_type=ParamsType.FULL, params=params))


@contextmanager
def open_tensors(path: str | os.PathLike[str]) -> Iterator[Any]:
    """A lazy view of a checked file: ``.keys()`` and ``.get_tensor(name)`` load one at a time.

    The view is of the whole file: its keys include the meta tensors' reserved names.
    """
    read_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except SafetensorError as exc:
        raise WireFormatError(f"{Path(path).name}: invalid safetensors data: {exc}") from None
