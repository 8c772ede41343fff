"""tensorfile.py: the header the streaming writer puts before tensor bytes is a file safetensors reads back
exactly, and any other bytes (crafted headers, truncation, pickles) are a CorruptCheckpointError naming the file.

Whole saves through these files are tested in test_verify/test_manager; here the format itself.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptguard.errors import CorruptCheckpointError
from ckptguard.format.tensorfile import parse_tensors, safetensors_header, tensor_problem

RELPATH = "state/model.safetensors"


def stream(tensors: dict[str, torch.Tensor]) -> bytes:
    """The bytes the writer streams: our header, then each tensor's memory in the header's order."""
    header, order = safetensors_header(tensors)
    return header + b"".join(tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for k in order)


def crafted(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g)
    return {
        "f64": base.double(), "f32": base, "f16": base.half(), "bf16": base.bfloat16(),
        "i64": (base * 100).long(), "i32": (base * 100).int(), "i16": (base * 100).short(), "i8": (base * 10).char(),
        "u8": (base * 10).abs().byte(), "bool": base > 0, "f8e4m3": base.to(torch.float8_e4m3fn),
        "f8e5m2": base.to(torch.float8_e5m2), "u16": (base * 10).abs().to(torch.uint16),
        "u32": (base * 10).abs().to(torch.uint32), "u64": (base * 10).abs().to(torch.uint64),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "transposed": base.t(),
    }  # fmt: skip


def assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key


def test_every_supported_dtype_streams_into_a_file_safetensors_reads_back_bit_identical(tmp_path: Path) -> None:
    tensors = every_dtype()
    data = stream(tensors)
    (tmp_path / "m.safetensors").write_bytes(data)
    assert_identical(load_file(tmp_path / "m.safetensors"), tensors)  # the library itself, not our parser
    assert_identical(parse_tensors(data, RELPATH), tensors)


def test_tensors_are_aligned_to_their_element_size_and_the_header_to_8_bytes() -> None:
    tensors = {"a_byte": torch.ones(3, dtype=torch.uint8), "b_double": torch.ones(3, dtype=torch.float64),
               "c_half": torch.ones(5, dtype=torch.float16), "d_float": torch.ones(1)}  # fmt: skip
    header, order = safetensors_header(tensors)
    length = int.from_bytes(header[:8], "little")
    assert length % 8 == 0 and len(header) == 8 + length
    parsed = json.loads(header[8:])
    assert parsed["__metadata__"] == {"format": "pt"}
    assert order == ["b_double", "d_float", "c_half", "a_byte"]  # largest element first, then by name
    for key in order:
        start = parsed[key]["data_offsets"][0]
        assert start % tensors[key].element_size() == 0, key


@pytest.mark.parametrize(
    ("tensor", "problem"),
    [
        (torch.eye(3).to_sparse(), "is sparse (torch.sparse_coo); make it dense with `.to_dense()` before saving"),
        (torch.empty(3, device="meta"), "is on the meta device (it has no data); materialise it"),
        (torch.ones(2, dtype=torch.complex64), "has dtype torch.complex64, which safetensors cannot store; convert it"),
    ],
)
def test_a_tensor_safetensors_cannot_hold_is_refused_naming_the_fix(tensor: torch.Tensor, problem: str) -> None:
    problem_text = tensor_problem(tensor)
    assert problem_text is not None and problem_text.startswith(problem)
    with pytest.raises(ValueError, match=r"^tensor 'layers\.0\.w' " + problem.replace("(", r"\(").replace(")", r"\)")):
        safetensors_header({"ok": torch.ones(1), "layers.0.w": tensor})


def test_a_dense_cpu_tensor_has_no_problem() -> None:
    assert tensor_problem(torch.ones(2, 2).t()) is None


def refused(data: bytes, where: Path | None = None) -> CorruptCheckpointError:
    with pytest.raises(CorruptCheckpointError) as raised:
        parse_tensors(data, RELPATH, where=where)
    err = raised.value
    assert err.message.startswith(f"{RELPATH} is not a valid safetensors file (")
    return err


def test_a_truncated_file_is_named_corrupt_with_the_checkpoint_path(tmp_path: Path) -> None:
    data = stream({"w": torch.arange(64, dtype=torch.float32)})
    for cut in (0, 4, 8, 20, len(data) - 4):
        err = refused(data[:cut], where=tmp_path / "checkpoint-3")
        assert err.path == str(tmp_path / "checkpoint-3")
        assert "Resume from an earlier checkpoint" in str(err)


@pytest.mark.parametrize(
    ("label", "entry", "data"),
    [
        ("offsets past the data", {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}, bytes(16)),
        ("shape larger than its bytes", {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}, bytes(16)),
        ("dtype wider than its bytes", {"dtype": "F64", "shape": [4], "data_offsets": [0, 16]}, bytes(16)),
        ("an unknown dtype", {"dtype": "PY_OBJECT", "shape": [4], "data_offsets": [0, 16]}, bytes(16)),
        ("reversed offsets", {"dtype": "U8", "shape": [0], "data_offsets": [16, 0]}, bytes(16)),
        ("negative shape", {"dtype": "U8", "shape": [-16], "data_offsets": [0, 16]}, bytes(16)),
    ],
)
def test_a_crafted_header_whose_entry_disagrees_with_its_bytes_is_refused(label: str, entry: dict, data: bytes) -> None:
    refused(crafted({"w": entry}, data))


def test_overlapping_tensors_and_bytes_no_tensor_owns_are_refused() -> None:
    f32 = {"dtype": "F32", "shape": [4]}
    refused(crafted({"a": {**f32, "data_offsets": [0, 16]}, "b": {**f32, "data_offsets": [8, 24]}}, bytes(24)))
    refused(crafted({"a": {**f32, "data_offsets": [0, 16]}}, bytes(32)))  # 16 trailing bytes nobody claims


def test_a_header_length_past_the_file_or_not_json_is_refused() -> None:
    refused(struct.pack("<Q", 1 << 40) + b"{}")
    refused(struct.pack("<Q", 8) + b"not json")
    refused(struct.pack("<Q", 2) + b"[]")


def test_a_pickle_in_place_of_a_tensor_file_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (sentinel,))

    for data in (pickle.dumps(Hostile()), pickle.dumps({"w": Hostile()}, protocol=2)):
        refused(data)
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")  # torch's own format is a zip of pickles
    refused((tmp_path / "model.pt").read_bytes())
    assert not sentinel.exists()
