"""Wire format: model files are safetensors with JSON metadata, control messages JSON frames.

Nothing received is ever unpickled: every reader refuses a pickle with a WireFormatError.
"""

from __future__ import annotations

import json
import pickle
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client_agent.fl_model import FLModel, ParamsType
from client_agent.wire import (
    MAX_FRAME_BYTES,
    WireFormatError,
    all_finite,
    decode_frame_body,
    encode_frame,
    first_nonfinite_tensor,
    load_state_dict,
    open_tensors,
    read_header,
    read_model_file,
    recv_frame,
    save_state_dict,
    send_frame,
    write_model_file,
)
from jobs.aggregation import FileTensorSource, SiteUpdate


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert isinstance(actual, torch.Tensor), type(actual)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual, expected), (actual, expected)


def write_raw(path: Path, header: object, data: bytes = b"") -> Path:
    """A file in safetensors layout with any header: 8-byte length, JSON, data."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# --------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------


def test_fl_model_round_trips_through_a_model_file(tmp_path: Path) -> None:
    params = {
        "fc.weight": torch.tensor([[1.5, -2.25, 3.0], [0.0, 4.5, -1.0]]),
        "fc.bias": torch.tensor([0.125, -0.5], dtype=torch.float64),
        "half": torch.tensor([1.5, -3.0], dtype=torch.float16),
        "brain": torch.tensor([0.5, 2.0, -7.0], dtype=torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "bn.num_batches_tracked": torch.tensor(12345678901, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "pixels": torch.tensor([0, 128, 255], dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
    }
    model = FLModel(
        params_type=ParamsType.DIFF,
        params=params,
        metrics={"accuracy": 0.75, "loss": 0.5, "note": "ok", "per_class": [0.5, 1.0]},
        current_round=3,
        total_rounds=10,
        start_round=1,
        meta={"NUM_STEPS_CURRENT_ROUND": 42, "custom": {"k": "v"}},
    )

    path = write_model_file(tmp_path / "update.safetensors", model)
    back = read_model_file(path)

    assert back.params_type is ParamsType.DIFF
    assert back.params is not None
    assert set(back.params) == set(params)
    for name, tensor in params.items():
        assert_same(back.params[name], tensor)
    assert back.params["scalar"].dim() == 0
    assert back.metrics == {"accuracy": 0.75, "loss": 0.5, "note": "ok", "per_class": [0.5, 1.0]}
    assert back.meta == {"NUM_STEPS_CURRENT_ROUND": 42, "custom": {"k": "v"}}
    assert (back.current_round, back.total_rounds, back.start_round) == (3, 10, 1)
    assert back.weight == 42.0


def test_model_file_is_a_plain_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    path = save_state_dict(tmp_path / "m.safetensors", {"w": torch.tensor([1.0, 2.0])})

    assert_same(load_file(str(path))["w"], torch.tensor([1.0, 2.0]))
    assert read_model_file(path).params_type is ParamsType.FULL
    assert not list(tmp_path.glob(".*tmp")), "the temporary file of the atomic write was left"


def test_numpy_arrays_are_accepted_and_read_back_as_tensors(tmp_path: Path) -> None:
    matrix = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
    params = {
        "w": matrix.T,  # not contiguous
        "n": np.array([7, 8], dtype=np.int64),
        "h": np.array([0.5, -1.0], dtype=np.float16),
    }

    path = save_state_dict(tmp_path / "np.safetensors", params)
    back = load_state_dict(path)

    assert_same(back["w"], torch.tensor([[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]))
    assert_same(back["n"], torch.tensor([7, 8], dtype=torch.int64))
    assert_same(back["h"], torch.tensor([0.5, -1.0], dtype=torch.float16))


def test_a_zero_dim_numpy_array_keeps_its_shape(tmp_path: Path) -> None:
    # A BatchNorm counter exported through numpy is a 0-dim array; saved as shape [1] it would
    # no longer match the global model's shape [] and the update would be rejected.
    params = {"num_batches_tracked": np.array(7, dtype=np.int64), "t": np.array(2.5)}

    back = load_state_dict(save_state_dict(tmp_path / "np0.safetensors", params))

    assert_same(back["num_batches_tracked"], torch.tensor(7, dtype=torch.int64))
    assert_same(back["t"], torch.tensor(2.5, dtype=torch.float64))


def test_tied_weights_are_saved_under_both_names(tmp_path: Path) -> None:
    embedding = torch.nn.Embedding(4, 3)
    decoder = torch.nn.Linear(3, 4, bias=False)
    decoder.weight = embedding.weight  # tied, as in language models
    state = {"embed.weight": embedding.weight, "decoder.weight": decoder.weight}
    base = torch.arange(6.0)
    halves = {"first": base[:3], "second": base[3:]}  # two views of one storage

    back = load_state_dict(save_state_dict(tmp_path / "tied.safetensors", state))
    back_halves = load_state_dict(save_state_dict(tmp_path / "halves.safetensors", halves))

    assert_same(back["embed.weight"], embedding.weight.detach())
    assert_same(back["decoder.weight"], embedding.weight.detach())
    assert_same(back_halves["first"], torch.tensor([0.0, 1.0, 2.0]))
    assert_same(back_halves["second"], torch.tensor([3.0, 4.0, 5.0]))


def test_scalar_tensors_in_metrics_are_written_as_numbers(tmp_path: Path) -> None:
    model = FLModel(
        params={"w": torch.zeros(1)}, metrics={"acc": torch.tensor(0.5), "n": np.int64(3)}
    )

    back = read_model_file(write_model_file(tmp_path / "m.safetensors", model))

    assert back.metrics == {"acc": 0.5, "n": 3}


def test_metrics_holding_a_non_json_value_raise_type_error_naming_it(tmp_path: Path) -> None:
    class Confusion:
        pass

    model = FLModel(params={"w": torch.zeros(1)}, metrics={"confusion": Confusion()})
    path = tmp_path / "m.safetensors"

    with pytest.raises(TypeError) as info:
        write_model_file(path, model)

    assert "metrics" in str(info.value)
    assert "Confusion" in str(info.value)
    assert not path.exists()


def test_params_that_are_not_tensors_raise_type_error_naming_the_tensor(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="'w'.*list"):
        save_state_dict(tmp_path / "m.safetensors", {"w": [1.0, 2.0]})


# --- refusing what is not a model file ------------------------------------------------------


def _read_with_file_source(path: Path) -> object:
    return FileTensorSource(path)


def _read_with_open_tensors(path: Path) -> object:
    with open_tensors(path) as handle:
        return list(handle.keys())


READERS: dict[str, Callable[[Path], object]] = {
    "read_model_file": read_model_file,
    "load_state_dict": load_state_dict,
    "read_header": read_header,
    "FileTensorSource": _read_with_file_source,
    "SiteUpdate.from_file": lambda path: SiteUpdate.from_file("site-1", path),
    "open_tensors": _read_with_open_tensors,
}


@pytest.fixture(params=sorted(READERS))
def reader(request: pytest.FixtureRequest) -> Callable[[Path], object]:
    return READERS[request.param]


class WritesMarker:
    """Unpickling this creates ``path``: the test fails if anything unpickles received bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_a_torch_save_pickle_is_refused(tmp_path: Path, reader: Callable[[Path], object]) -> None:
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, path)

    with pytest.raises(WireFormatError, match="model.safetensors"):
        reader(path)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_malicious_pickle_is_refused_and_never_unpickled(
    tmp_path: Path, reader: Callable[[Path], object], protocol: int
) -> None:
    # The payload works: unpickling a twin of it does create its marker.
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(WritesMarker(control), protocol=protocol)).close()
    assert control.exists()
    marker = tmp_path / "marker"
    path = tmp_path / "update.safetensors"
    path.write_bytes(pickle.dumps(WritesMarker(marker), protocol=protocol))

    with pytest.raises(WireFormatError, match="update.safetensors"):
        reader(path)

    assert not marker.exists()


GARBAGE: dict[str, bytes] = {
    "empty": b"",
    "shorter-than-a-length": b"\x01\x02\x03",
    "text": b"hello, this is not a model at all",
    "length-past-end": struct.pack("<Q", 1000) + b"{}",
    "header-not-json": struct.pack("<Q", 6) + b"\xff\xfe{{{{",
    "header-a-list": struct.pack("<Q", 2) + b"[]",
    "metadata-not-strings": struct.pack("<Q", 29) + b'{"__metadata__": {"a": 1}}   ',
}


@pytest.mark.parametrize("content", list(GARBAGE.values()), ids=list(GARBAGE))
def test_bytes_that_are_not_a_model_file_are_refused_naming_the_file(
    tmp_path: Path, reader: Callable[[Path], object], content: bytes
) -> None:
    path = tmp_path / "site-3-round-1.safetensors"
    path.write_bytes(content)

    with pytest.raises(WireFormatError, match="site-3-round-1.safetensors"):
        reader(path)


def test_a_missing_file_is_a_wire_format_error(tmp_path: Path) -> None:
    with pytest.raises(WireFormatError, match="gone.safetensors"):
        read_model_file(tmp_path / "gone.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_a_truncated_model_file_is_refused_naming_the_file(
    tmp_path: Path, reader: Callable[[Path], object], keep: float
) -> None:
    whole = save_state_dict(tmp_path / "whole.safetensors", {"w": torch.arange(64.0)}).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(whole[: int(len(whole) * keep)])  # cuts the data, then the header

    with pytest.raises(WireFormatError, match="cut.safetensors"):
        reader(path)


@pytest.mark.parametrize(
    "dtype",
    [
        "F8_E4M3",  # a real safetensors dtype we do not accept
        "U16",
        "C64",
        "object",
        None,
    ],
    ids=["F8_E4M3", "U16", "C64", "object", "None"],
)
def test_a_tensor_with_an_unsupported_dtype_is_refused_naming_the_file(
    tmp_path: Path, reader: Callable[[Path], object], dtype: object
) -> None:
    path = write_raw(
        tmp_path / "odd.safetensors",
        {"w": {"dtype": dtype, "shape": [2], "data_offsets": [0, 4]}},
        b"\0" * 4,
    )

    with pytest.raises(WireFormatError, match="odd.safetensors") as info:
        reader(path)

    assert "'w'" in str(info.value)


@pytest.mark.parametrize("dtype", [["F32"], {"name": "F32"}], ids=["list", "dict"])
def test_a_dtype_that_is_not_a_string_is_refused_naming_the_file(
    tmp_path: Path, dtype: object
) -> None:
    path = write_raw(
        tmp_path / "odd.safetensors",
        {"w": {"dtype": dtype, "shape": [2], "data_offsets": [0, 4]}},
        b"\0" * 4,
    )

    with pytest.raises(WireFormatError, match="odd.safetensors"):
        read_model_file(path)


@pytest.mark.parametrize(
    "info",
    [
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 400]},  # past the end
        {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},
        {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
        {"dtype": "F32", "shape": [2], "data_offsets": "0-8"},
        {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]},
    ],
)
def test_tensor_offsets_or_shape_outside_the_file_are_refused(
    tmp_path: Path, reader: Callable[[Path], object], info: dict[str, Any]
) -> None:
    path = write_raw(tmp_path / "far.safetensors", {"w": info}, b"\0" * 8)

    with pytest.raises(WireFormatError, match="far.safetensors"):
        reader(path)


def test_tensor_bytes_that_do_not_match_the_shape_are_refused(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "short.safetensors",
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}},
        b"\0" * 8,
    )

    with pytest.raises(WireFormatError, match="short.safetensors"):
        read_model_file(path)
    with pytest.raises(WireFormatError, match="short.safetensors"):
        FileTensorSource(path)


@pytest.mark.parametrize(
    ("tensors", "data", "problem"),
    [
        (  # the same bytes read as two tensors
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            8,
            "overlaps",
        ),
        (  # bytes between tensors that belong to none
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            12,
            "gap",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 12, "belong to none"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "invalid shape"),
    ],
    ids=["overlapping", "gap", "trailing bytes", "bool dimension"],
)
def test_tensors_must_tile_the_data_exactly(
    tmp_path: Path, tensors: dict[str, Any], data: int, problem: str
) -> None:
    # Aggregation seeks to each tensor's offsets itself: two names sharing bytes, or bytes no
    # tensor owns, are refused as the safetensors format requires, for every reader.
    path = write_raw(tmp_path / "tiles.safetensors", tensors, b"\0" * data)

    with pytest.raises(WireFormatError, match=problem):
        read_header(path)
    with pytest.raises(WireFormatError, match="tiles.safetensors"):
        FileTensorSource(path)


@pytest.mark.parametrize(
    "fields",
    [
        '{"metrics": {"loss": Infinity}}',
        '{"metrics": {"loss": NaN}}',
        '{"meta": {"NUM_STEPS_CURRENT_ROUND": -Infinity}}',
        '{"meta": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"current_round": ' + "9" * 5000 + "}",
    ],
    ids=["Infinity", "NaN", "-Infinity", "nested 100,000 deep", "5000 digits"],
)
def test_metadata_json_is_strict(tmp_path: Path, fields: str) -> None:
    # Python's json takes NaN and Infinity, which no database column stores, and gives up on
    # deep nesting with a RecursionError: each is a WireFormatError naming the file instead.
    path = write_raw(
        tmp_path / "strict.safetensors",
        {
            "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "__metadata__": {"fedportal.flmodel": fields},
        },
        b"\0" * 4,
    )

    with pytest.raises(WireFormatError, match="strict.safetensors"):
        SiteUpdate.from_file("site-1", path)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_first_nonfinite_tensor_names_the_tensor_in_every_float_dtype(
    tmp_path: Path, dtype: torch.dtype, bad: float
) -> None:
    clean = torch.arange(10, dtype=dtype)
    dirty = torch.zeros(3000, dtype=dtype)
    dirty[2999] = bad  # in the last chunk of the tensor
    path = save_state_dict(
        tmp_path / "m.safetensors", {"clean": clean, "dirty": dirty, "n": torch.tensor(7)}
    )

    assert first_nonfinite_tensor(path, chunk_bytes=1024) == "dirty"
    assert (
        first_nonfinite_tensor(save_state_dict(tmp_path / "ok.safetensors", {"c": clean})) is None
    )


def test_all_finite_reads_half_precision_as_bits() -> None:
    halves = torch.tensor([1.0, -2.0, 65504.0], dtype=torch.float16)
    assert all_finite(halves.view(torch.int16).numpy(), "F16")
    assert not all_finite(
        torch.tensor([1.0, float("inf")], dtype=torch.float16).view(torch.int16).numpy(), "F16"
    )
    brains = torch.tensor([3.0e38, -1.0], dtype=torch.bfloat16)
    assert all_finite(brains.view(torch.int16).numpy(), "BF16")
    assert not all_finite(
        torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.int16).numpy(), "BF16"
    )
    assert all_finite(np.array([1, 2**62], dtype=np.int64), "I64")


def test_bad_flmodel_metadata_is_refused(tmp_path: Path) -> None:
    tensor = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    not_json = write_raw(
        tmp_path / "a.safetensors",
        {**tensor, "__metadata__": {"fedportal.flmodel": "{not json"}},
        b"\0" * 4,
    )
    bad_type = write_raw(
        tmp_path / "b.safetensors",
        {**tensor, "__metadata__": {"fedportal.flmodel": '{"params_type": "HALF"}'}},
        b"\0" * 4,
    )

    with pytest.raises(WireFormatError, match="a.safetensors"):
        read_model_file(not_json)
    with pytest.raises(WireFormatError, match="b.safetensors"):
        read_model_file(bad_type)


@pytest.mark.parametrize(
    "fields",
    ["[1, 2]", '{"meta": [1, 2]}', '{"meta": "x"}', '{"metrics": "high"}', '{"metrics": [1, 2]}'],
)
@pytest.mark.parametrize(
    "read",
    [read_model_file, lambda path: SiteUpdate.from_file("site-1", path)],
    ids=["read_model_file", "SiteUpdate.from_file"],
)
def test_flmodel_metadata_of_the_wrong_shape_is_refused(
    tmp_path: Path, read: Callable[[Path], object], fields: str
) -> None:
    # A site's update is received bytes: a bad one must be a WireFormatError (the site's update
    # is rejected), not an AttributeError that ends the whole run.
    path = write_raw(
        tmp_path / "u.safetensors",
        {
            "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "__metadata__": {"fedportal.flmodel": fields},
        },
        b"\0" * 4,
    )

    with pytest.raises(WireFormatError, match="u.safetensors"):
        read(path)


# --------------------------------------------------------------------------------------------
# JSON frames
# --------------------------------------------------------------------------------------------


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.settimeout(5)
    right.settimeout(5)
    yield left, right
    left.close()
    right.close()


def test_a_frame_is_a_big_endian_length_then_json() -> None:
    message = {"type": "log", "key": "loss", "value": 0.25, "step": None}

    frame = encode_frame(message)

    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert decode_frame_body(frame[4:]) == message


def test_frames_round_trip_over_a_socket(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = socket_pair
    messages: list[dict[str, Any]] = [
        {"type": "task", "task_id": "j:0:site-1", "meta": {"lr": 0.01}, "model_path": None},
        {"type": "log", "key": "acc", "value": np.float32(0.5), "step": torch.tensor(3)},
        {"type": "end", "text": "ünïcødé ✓"},
    ]

    for message in messages:
        send_frame(left, message)
    received = [recv_frame(right) for _ in messages]

    assert received == [
        messages[0],
        {"type": "log", "key": "acc", "value": 0.5, "step": 3},
        messages[2],
    ]


def test_recv_frame_at_end_of_stream_raises_connection_error(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = socket_pair
    left.sendall(encode_frame({"type": "result"})[:6])  # half a frame, then the peer goes
    left.close()

    with pytest.raises(ConnectionError):
        recv_frame(right)


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe\x00garbage",
        b"not json",
        b"[1, 2, 3]",
        b'"task"',
        b"null",
        b'{"task_id": "x"}',
        b'{"type": 3}',
        b'{"type": null}',
    ],
)
def test_a_frame_that_is_not_an_object_with_a_string_type_is_refused(
    socket_pair: tuple[socket.socket, socket.socket], body: bytes
) -> None:
    left, right = socket_pair

    with pytest.raises(WireFormatError):
        decode_frame_body(body)
    left.sendall(struct.pack(">I", len(body)) + body)
    with pytest.raises(WireFormatError):
        recv_frame(right)


def test_an_oversize_frame_length_is_refused_before_reading_the_body(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = socket_pair
    left.sendall(struct.pack(">I", MAX_FRAME_BYTES + 1) + b"{")

    with pytest.raises(WireFormatError, match="exceeds"):
        recv_frame(right)


def test_an_oversize_message_is_refused_when_encoding() -> None:
    with pytest.raises(WireFormatError, match="exceeds"):
        encode_frame({"type": "log", "blob": "x" * MAX_FRAME_BYTES})


@pytest.mark.parametrize("message", [{"key": "no type"}, {"type": 1}, ["type", "log"]])
def test_encoding_a_message_without_a_string_type_is_refused(message: Any) -> None:
    with pytest.raises(WireFormatError, match="type"):
        encode_frame(message)
