"""The safetensors format: the header our streaming writer puts in front of tensor bytes, and the one
way a tensor file is parsed back (through the safetensors library, which validates it).

Parsing happens in restore, in deep verification and in adapter loading; it lives here once so a
damaged file gets the same error, with the same wording, wherever it is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ckptguard.errors import CorruptCheckpointError

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}


def tensor_problem(t: torch.Tensor) -> str | None:
    """Why `t` cannot be stored as it is (None if it can); checked for every tensor before a save writes."""
    if t.layout != torch.strided:
        return f"is sparse ({t.layout}); make it dense with `.to_dense()` before saving"
    if t.device.type == "meta":
        return "is on the meta device (it has no data); materialise it (e.g. `to_empty()` and load weights) first"
    if t.dtype not in _DTYPES:
        return f"has dtype {t.dtype}, which safetensors cannot store; convert it (e.g. `.view(torch.float32)`)"
    return None


def safetensors_header(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[str]]:
    """The 8-byte length + JSON header, and the order the tensor bytes follow in.

    Tensors are laid out largest element size first (as safetensors does) so every tensor stays
    aligned to its element size when the file is memory-mapped.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in order:
        t = tensors[key]
        problem = tensor_problem(t)
        if problem is not None:
            raise ValueError(f"tensor {key!r} {problem}")
        size = t.numel() * t.element_size()
        header[key] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, order


def parse_tensors(data: bytes, relpath: str, *, where: Path | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a verified file's bytes; CorruptCheckpointError naming the file if they do not parse."""
    from safetensors.torch import load as load_safetensors

    try:
        return load_safetensors(data)
    except Exception as exc:  # the safetensors library's own header validation raises several types
        raise CorruptCheckpointError(f"{relpath} is not a valid safetensors file ({exc})", path=where) from exc
