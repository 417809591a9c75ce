"""Tensors in FLModel.meta (SCAFFOLD's control variates) travel in the model file as tensors.

They are stored under ``__meta__/<key>/<name>`` beside the params, listed in the JSON, and come
back in ``meta[key]``; no reader shows them as params.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from client_agent.fl_model import AlgorithmConstants, FLModel, ParamsType
from client_agent.frames import dumps
from client_agent.wire import (
    META_TENSOR_KEYS_FIELD,
    METADATA_KEY,
    WireFormatError,
    first_nonfinite_tensor,
    load_state_dict,
    read_header,
    read_model_file,
    write_model_file,
)
from jobs.aggregation import FileTensorSource, MemoryTensorSource, SiteUpdate, check_update

DIFF = AlgorithmConstants.SCAFFOLD_CTRL_DIFF
GLOBAL = AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert isinstance(actual, torch.Tensor), type(actual)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual, expected), (actual, expected)


def scaffold_update() -> FLModel:
    """A site's SCAFFOLD answer: a DIFF of two tensors and the change of its controls."""
    return FLModel(
        params_type=ParamsType.DIFF,
        params={
            "fc.weight": torch.tensor([[1.5, -2.0]]),
            "fc.bias": torch.tensor([0.25]),
        },
        metrics={"accuracy": 0.5},
        current_round=2,
        meta={
            "NUM_STEPS_CURRENT_ROUND": 8,
            DIFF: {
                # what PTScaffoldHelper.get_delta_controls gives: numpy arrays
                "fc.weight": np.array([[0.5, -0.75]], dtype=np.float32),
                "fc.bias": np.array([3.0], dtype=np.float32),
            },
        },
    )


def write_raw(path: Path, tensors: dict[str, list[float]], fields: dict[str, Any]) -> Path:
    """A file in safetensors layout, float32 tensors in order, with any names and FLModel
    JSON: what a sender other than write_model_file could produce."""
    header: dict[str, Any] = {"__metadata__": {METADATA_KEY: json.dumps(fields)}}
    data = b""
    for name, values in tensors.items():
        raw = struct.pack(f"<{len(values)}f", *values)
        header[name] = {
            "dtype": "F32",
            "shape": [len(values)],
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


# --------------------------------------------------------------------------------------------
# Writing and reading a model file
# --------------------------------------------------------------------------------------------


def test_meta_tensors_round_trip_numpy_and_torch_in_torch_out(tmp_path: Path) -> None:
    model = scaffold_update()
    model.meta[GLOBAL] = {
        "fc.weight": torch.tensor([[-1.0, 2.0]], dtype=torch.float64),
        "step": torch.tensor(3, dtype=torch.int64),  # a 0-dim tensor stays a tensor
    }

    back = read_model_file(write_model_file(tmp_path / "u.safetensors", model))

    assert back.params is not None
    assert set(back.params) == {"fc.weight", "fc.bias"}
    assert_same(back.params["fc.weight"], torch.tensor([[1.5, -2.0]]))
    assert back.params_type == ParamsType.DIFF
    assert back.metrics == {"accuracy": 0.5}
    assert back.current_round == 2
    assert set(back.meta) == {"NUM_STEPS_CURRENT_ROUND", DIFF, GLOBAL}
    assert back.meta["NUM_STEPS_CURRENT_ROUND"] == 8
    assert set(back.meta[DIFF]) == {"fc.weight", "fc.bias"}
    assert_same(back.meta[DIFF]["fc.weight"], torch.tensor([[0.5, -0.75]]))
    assert_same(back.meta[DIFF]["fc.bias"], torch.tensor([3.0]))
    assert_same(back.meta[GLOBAL]["fc.weight"], torch.tensor([[-1.0, 2.0]], dtype=torch.float64))
    assert_same(back.meta[GLOBAL]["step"], torch.tensor(3, dtype=torch.int64))
    assert load_state_dict(tmp_path / "u.safetensors").keys() == {"fc.weight", "fc.bias"}


def test_the_file_holds_meta_tensors_under_reserved_names_listed_in_the_json(
    tmp_path: Path,
) -> None:
    path = write_model_file(tmp_path / "u.safetensors", scaffold_update())

    tensors, metadata = read_header(path)

    assert set(tensors) == {
        "fc.weight",
        "fc.bias",
        "__meta__/scaffold_c_diff/fc.weight",
        "__meta__/scaffold_c_diff/fc.bias",
    }
    assert tensors["__meta__/scaffold_c_diff/fc.weight"]["shape"] == [1, 2]
    fields = json.loads(metadata[METADATA_KEY])
    assert fields[META_TENSOR_KEYS_FIELD] == [DIFF]
    assert fields["meta"] == {"NUM_STEPS_CURRENT_ROUND": 8}  # JSON holds no tensor


def test_a_tensor_shared_by_params_and_meta_is_written_under_both_names(tmp_path: Path) -> None:
    shared = torch.tensor([1.0, 2.0])
    model = FLModel(params={"w": shared}, meta={GLOBAL: {"w": shared}})

    back = read_model_file(write_model_file(tmp_path / "u.safetensors", model))

    assert back.params is not None
    assert_same(back.params["w"], torch.tensor([1.0, 2.0]))
    assert_same(back.meta[GLOBAL]["w"], torch.tensor([1.0, 2.0]))


def test_a_file_without_meta_tensors_is_written_exactly_as_before(tmp_path: Path) -> None:
    params = {"w": torch.tensor([1.0, -1.0])}
    model = FLModel(params=params, metrics={"loss": 0.5}, meta={"custom": {"k": "v"}})
    path = write_model_file(tmp_path / "new.safetensors", model)
    # The format before meta tensors: the same six fields, no others.
    old_fields = {
        "params_type": "FULL",
        "metrics": {"loss": 0.5},
        "meta": {"custom": {"k": "v"}},
        "current_round": None,
        "total_rounds": None,
        "start_round": 0,
    }
    save_file(params, str(tmp_path / "old.safetensors"), metadata={METADATA_KEY: dumps(old_fields)})

    assert path.read_bytes() == (tmp_path / "old.safetensors").read_bytes()
    back = read_model_file(tmp_path / "old.safetensors")
    assert back.meta == {"custom": {"k": "v"}}
    assert back.params is not None and set(back.params) == {"w"}
    assert FileTensorSource(tmp_path / "old.safetensors").meta_tensors(DIFF) == {}


def test_params_may_not_use_the_reserved_prefix(tmp_path: Path) -> None:
    model = FLModel(params={"__meta__/scaffold_c_diff/w": torch.zeros(1)})

    with pytest.raises(
        ValueError, match=r"FLModel.params\['__meta__/scaffold_c_diff/w'\].*reserved"
    ):
        write_model_file(tmp_path / "u.safetensors", model)

    assert not (tmp_path / "u.safetensors").exists()


@pytest.mark.parametrize(
    ("meta", "error", "message"),
    [
        ({"a/b": {"w": torch.zeros(1)}}, ValueError, r"meta key 'a/b' holds tensors"),
        ({"": {"w": torch.zeros(1)}}, ValueError, r"meta key '' holds tensors"),
        ({DIFF: {"": torch.zeros(1)}}, ValueError, r"meta\['scaffold_c_diff'\].*not be empty"),
        (
            {DIFF: {"w": torch.zeros(1, dtype=torch.complex64)}},
            TypeError,
            r"meta\['scaffold_c_diff'\]\['w'\] has dtype torch.complex64",
        ),
        # A mapping that mixes tensors with other values is JSON, where a 2-element tensor fails.
        ({DIFF: {"w": torch.zeros(2), "n": 1}}, TypeError, r"a mapping of names to tensors"),
    ],
    ids=["slash-in-key", "empty-key", "empty-name", "bad-dtype", "mixed"],
)
def test_meta_that_cannot_travel_is_refused_naming_it(
    tmp_path: Path, meta: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        write_model_file(
            tmp_path / "u.safetensors", FLModel(params={"w": torch.zeros(1)}, meta=meta)
        )

    assert not (tmp_path / "u.safetensors").exists()


def test_a_mapping_of_scalar_tensors_comes_back_as_tensors_not_numbers(tmp_path: Path) -> None:
    model = FLModel(params={"w": torch.zeros(1)}, meta={"stats": {"loss": torch.tensor(0.5)}})

    back = read_model_file(write_model_file(tmp_path / "u.safetensors", model))

    assert_same(back.meta["stats"]["loss"], torch.tensor(0.5))


def test_importing_the_client_api_does_not_import_torch() -> None:
    code = "import sys, client_agent.api; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# Malformed files
# --------------------------------------------------------------------------------------------


def listing(*keys: object) -> dict[str, Any]:
    return {"params_type": "DIFF", "meta": {}, META_TENSOR_KEYS_FIELD: list(keys)}


@pytest.mark.parametrize(
    ("tensors", "fields", "message"),
    [
        (["w", "__meta__/nokey"], listing("nokey"), r"'__meta__/nokey' has a reserved name"),
        (["w", "__meta__//w"], listing(), r"'__meta__//w' has a reserved name"),
        (["w", "__meta__/k/"], listing("k"), r"'__meta__/k/' has a reserved name"),
        (["w", "__meta__/k/w"], listing(), r"'__meta__/k/w' belongs to meta key 'k', which"),
        (["w", "__meta__/k/w"], {"meta": {}}, r"'__meta__/k/w' belongs to meta key 'k', which"),
        (["w", "__meta__/k/w"], listing("k", "k"), r"lists a meta key twice"),
        (["w", "__meta__/k/w"], listing("k", "j"), r"lists meta key 'j', but the file holds no"),
        (["w", "__meta__/k/w"], listing("k", 3), r"holds 3, not a non-empty string"),
        (
            ["w", "__meta__/k/w"],
            {"meta": {"k": 1}, META_TENSOR_KEYS_FIELD: ["k"]},
            r"meta key 'k' is both a JSON value and a set of tensors",
        ),
        (
            ["w", "__meta__/k/w"],
            {"meta": {}, META_TENSOR_KEYS_FIELD: "k"},
            r"meta_tensor_keys must be a list",
        ),
    ],
    ids=[
        "no-slash",
        "empty-key",
        "empty-name",
        "key-not-listed",
        "no-listing",
        "listed-twice",
        "listed-without-tensors",
        "key-not-a-string",
        "key-also-json",
        "listing-not-a-list",
    ],
)
@pytest.mark.parametrize(
    "reader",
    [read_header, read_model_file, FileTensorSource],
    ids=["read_header", "read_model_file", "FileTensorSource"],
)
def test_a_file_with_a_malformed_reserved_name_is_refused_naming_it(
    tmp_path: Path, reader: Any, tensors: list[str], fields: dict[str, Any], message: str
) -> None:
    path = write_raw(tmp_path / "bad.safetensors", {n: [1.0] for n in tensors}, fields)

    with pytest.raises(WireFormatError, match=message) as info:
        reader(path)

    assert str(info.value).startswith("bad.safetensors: ")


@pytest.mark.parametrize(
    "reader", [read_model_file, FileTensorSource], ids=["read_model_file", "FileTensorSource"]
)
def test_a_listed_meta_key_without_tensors_is_refused(tmp_path: Path, reader: Any) -> None:
    path = write_raw(tmp_path / "bad.safetensors", {"w": [1.0]}, listing(DIFF))

    with pytest.raises(WireFormatError, match=r"lists meta key 'scaffold_c_diff', but the file"):
        reader(path)


def test_layout_checks_cover_meta_tensors(tmp_path: Path) -> None:
    path = write_model_file(tmp_path / "u.safetensors", scaffold_update())
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    header["__meta__/scaffold_c_diff/fc.bias"]["shape"] = [2]  # 4 bytes cannot hold 2 floats
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + header_len :])

    with pytest.raises(WireFormatError, match=r"'__meta__/scaffold_c_diff/fc.bias' holds 4 bytes"):
        FileTensorSource(path)


# --------------------------------------------------------------------------------------------
# Server-side readers
# --------------------------------------------------------------------------------------------


def test_file_source_serves_the_params_and_the_meta_tensors_apart(tmp_path: Path) -> None:
    source = FileTensorSource(write_model_file(tmp_path / "u.safetensors", scaffold_update()))
    try:
        assert source.specs() == {
            "fc.weight": (torch.float32, (1, 2)),
            "fc.bias": (torch.float32, (1,)),
        }
        assert_same(source.read("fc.weight", 1, 2, None), torch.tensor([-2.0]))
        assert_same(source.read("fc.bias", 0, 1, torch.empty(4)), torch.tensor([0.25]))
        with pytest.raises(KeyError):
            source.read("__meta__/scaffold_c_diff/fc.bias", 0, 1, None)
        assert source.meta_tensor_keys() == [DIFF]

        controls = source.meta_tensors(DIFF)

        assert set(controls) == {"fc.weight", "fc.bias"}
        assert_same(controls["fc.weight"], torch.tensor([[0.5, -0.75]]))
        assert_same(controls["fc.bias"], torch.tensor([3.0]))
        assert source.meta_tensors(GLOBAL) == {}
    finally:
        source.close()


def test_a_scaffold_update_passes_the_update_checks_against_the_global_model(
    tmp_path: Path,
) -> None:
    update = SiteUpdate.from_file("site-1", write_model_file(tmp_path / "u.sft", scaffold_update()))
    global_specs = MemoryTensorSource(
        {"fc.weight": torch.zeros(1, 2), "fc.bias": torch.zeros(1)}
    ).specs()

    check_update(global_specs, update)  # no "unexpected tensors"

    assert update.weight == 8.0
    assert update.params_type == ParamsType.DIFF
    update.source.close()


def test_a_meta_tensor_holding_nan_is_refused_naming_it(tmp_path: Path) -> None:
    model = scaffold_update()
    model.meta[DIFF]["fc.bias"] = np.array([np.nan], dtype=np.float32)
    path = write_model_file(tmp_path / "u.safetensors", model)
    source = FileTensorSource(path)

    with pytest.raises(
        WireFormatError,
        match=r"u.safetensors: meta tensor 'fc.bias' of 'scaffold_c_diff' holds NaN",
    ):
        source.meta_tensors(DIFF)

    source.close()
    assert first_nonfinite_tensor(path) == "__meta__/scaffold_c_diff/fc.bias"


def test_memory_source_serves_meta_tensors_checked() -> None:
    source = MemoryTensorSource(
        {"w": torch.tensor([1.0])},
        meta_tensors={
            DIFF: {"w": torch.tensor([0.5])},
            GLOBAL: {"w": torch.tensor([float("inf")], dtype=torch.bfloat16)},
        },
    )

    assert source.specs() == {"w": (torch.float32, (1,))}
    assert source.meta_tensor_keys() == [DIFF, GLOBAL]
    assert_same(source.meta_tensors(DIFF)["w"], torch.tensor([0.5]))
    assert source.meta_tensors("absent") == {}
    assert MemoryTensorSource({"w": torch.zeros(1)}).meta_tensors(DIFF) == {}
    with pytest.raises(WireFormatError, match=r"meta tensor 'w' of 'scaffold_c_global' holds Inf"):
        source.meta_tensors(GLOBAL)
    with pytest.raises(TypeError, match=r"meta_tensors\['k'\]\['w'\] must be a torch.Tensor"):
        MemoryTensorSource({}, meta_tensors={"k": {"w": [1.0]}})  # type: ignore[dict-item]
