"""DCP's ``sharded/.metadata``, read as hostile input: the one pickle a checkpoint holds.

torch.distributed.checkpoint records where every shard lives in a pickle, and its reader would
``pickle.load`` it. A checkpoint is untrusted even when its hashes verify (they prove integrity, not
origin), so here the pickle is decoded by an unpickler that can only rebuild DCP's own metadata:

* every global is one of an explicit set of (module, qualified name) pairs, looked up in a table,
  never imported or resolved attribute by attribute (protocol 4 would walk a dotted name such as
  ``torch.os.system`` through any module);
* every call (REDUCE, NEWOBJ) targets a member of that set, and state is only ever set (BUILD) on
  an instance of one of its classes, never on a class;
* the pickle is at most :data:`MAX_METADATA_BYTES`;
* the result is then checked field by field: DCP's record types only, and every storage path a
  relative path to a shard file the checkpoint's own manifest lists, each byte range inside it.

Any refusal is a :class:`~ckptguard.format.manifest.ManifestError`, so the checkpoint is invalid: ``verify``
names it and resume falls back to the previous checkpoint, as for any damaged one.
"""

from __future__ import annotations

import io
import pickle
from functools import cache
from pathlib import PurePosixPath
from typing import Any, ClassVar

import torch

from ckptguard.format.layout import DCP_METADATA, SHARDED_DIR
from ckptguard.format.manifest import Manifest, ManifestError, check_relative_path

MAX_METADATA_BYTES = 64 << 20  # DCP's index of a 70B model's shards and Adam moments is a few MB
METADATA_PATH = f"{SHARDED_DIR}/{DCP_METADATA}"


@cache
def _globals() -> dict[tuple[str, str], Any]:
    """The (module, name) pairs DCP's metadata is made of, and the objects they stand for."""
    from torch.distributed.checkpoint import filesystem, metadata
    from torch.serialization import _get_layout

    records = {
        name: getattr(metadata, name)
        for name in (
            "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
            "TensorProperties", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
        )
    }  # fmt: skip
    table: dict[tuple[str, str], Any] = {(metadata.__name__, k): v for k, v in records.items()}
    table[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    table[("torch.serialization", "_get_layout")] = _get_layout  # a layout by its name (torch.strided)
    table[("torch", "Size")] = torch.Size
    for value in vars(torch).values():
        if isinstance(value, torch.dtype):
            table[("torch", str(value).removeprefix("torch."))] = value
    table[("pathlib", "PosixPath")] = table[("pathlib", "PurePosixPath")] = _path_text  # checkpoint_id
    return table


def _path_text(*parts: str) -> str:
    """The checkpoint_id DCP records, as text: a pure path is built from strings, nothing touches the disk."""
    return str(PurePosixPath(*parts))


@cache
def _classes() -> tuple[type, ...]:
    return tuple(v for v in _globals().values() if isinstance(v, type) and v is not torch.Size)


@cache
def _callables() -> frozenset[int]:
    """The ids of everything in the table (they live as long as the table: it is cached for good)."""
    return frozenset(id(v) for v in _globals().values())


class _Unpickler(pickle._Unpickler):  # the Python unpickler: its dispatch table can be narrowed
    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        found = _globals().get((module, name))
        if found is None or "." in name:
            raise ManifestError(f"{METADATA_PATH} names {module}.{name}, which is not part of DCP's metadata")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise ManifestError(f"{METADATA_PATH} refers to a persistent object, which DCP's metadata never does")

    def _callable(self, func: Any) -> None:
        if id(func) not in _callables():
            raise ManifestError(f"{METADATA_PATH} calls {type(func).__name__}, which is not part of DCP's metadata")

    def load_reduce(self) -> None:
        self._callable(self.stack[-2])
        super().load_reduce()

    def load_newobj(self) -> None:
        self._callable(self.stack[-2])
        super().load_newobj()

    def load_newobj_ex(self) -> None:
        self._callable(self.stack[-3])
        super().load_newobj_ex()

    def load_obj(self) -> None:
        raise ManifestError(f"{METADATA_PATH} uses the OBJ opcode, which DCP never writes")

    def load_inst(self) -> None:
        raise ManifestError(f"{METADATA_PATH} uses the INST opcode, which DCP never writes")

    def load_build(self) -> None:
        target, state = self.stack[-2], self.stack[-1]
        if isinstance(target, type) or not isinstance(target, _classes()):
            raise ManifestError(f"{METADATA_PATH} sets the state of a {type(target).__name__}, not of a DCP record")
        if not isinstance(state, (dict, tuple)):
            raise ManifestError(f"{METADATA_PATH} gives a {type(target).__name__} a state of {type(state).__name__}")
        super().load_build()

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.OBJ[0]] = load_obj
    dispatch[pickle.INST[0]] = load_inst
    dispatch[pickle.BUILD[0]] = load_build


def parse(data: bytes, manifest: Manifest) -> Any:
    """DCP's Metadata from the bytes of ``.metadata``, checked against `manifest`; ManifestError if refused."""
    metadata = decode(data)
    check_storage(metadata, manifest)
    return metadata


def decode(data: bytes) -> Any:
    """DCP's Metadata from the bytes of ``.metadata``, its records checked; ManifestError if refused.

    Its shard references are left to :func:`check_storage`, which needs the checkpoint's manifest:
    the committing rank decodes the file it just wrote while the ranks still agree on the files.
    """
    if len(data) > MAX_METADATA_BYTES:
        raise ManifestError(f"{METADATA_PATH} is over the {MAX_METADATA_BYTES >> 20} MiB limit ({len(data)} bytes)")
    try:
        metadata = _Unpickler(io.BytesIO(data)).load()
    except ManifestError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise ManifestError(f"{METADATA_PATH} is not DCP metadata ({type(exc).__name__}: {str(exc)[:200]})") from None
    except RecursionError:
        raise ManifestError(f"{METADATA_PATH} nests too deep to be DCP metadata") from None
    _check_records(metadata)
    return metadata


def check_storage(md: Any, manifest: Manifest) -> None:
    """Every shard reference of decoded metadata lies inside a shard file `manifest` lists; ManifestError if not."""
    for index, info in md.storage_data.items():
        _check_storage(index.fqn, info, manifest)


def _fail(what: str) -> None:
    raise ManifestError(f"{METADATA_PATH}: {what}", what)


def _check_records(md: Any) -> None:
    """Only DCP's record types, in their places (where the shard references point is :func:`check_storage`'s)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorStorageMetadata,
    )

    if type(md) is not Metadata:
        _fail(f"holds a {type(md).__name__}, not DCP's Metadata")
    items = md.state_dict_metadata
    if not isinstance(items, dict) or not all(isinstance(k, str) for k in items):
        _fail("state_dict_metadata is not a mapping of names")
    for fqn, item in items.items():
        if type(item) is TensorStorageMetadata:
            _check_tensor(fqn, item)
        elif type(item) is not BytesStorageMetadata:
            _fail(f"entry {fqn[:100]!r} is a {type(item).__name__}, not a tensor or bytes record")
    if not isinstance(md.storage_data, dict):
        _fail("storage_data is not a mapping")
    for index, info in md.storage_data.items():
        if type(index) is not MetadataIndex or not isinstance(index.fqn, str) or index.fqn not in items:
            _fail(f"storage_data has a key {str(index)[:100]} that names no entry")
        if type(info) is not _StorageInfo:
            _fail(f"storage of {index.fqn[:100]!r} is a {type(info).__name__}, not DCP's _StorageInfo")
    if md.storage_meta is not None and (
        type(md.storage_meta) is not StorageMeta or not isinstance(md.storage_meta.modules, list)
    ):
        _fail("storage_meta is not DCP's StorageMeta")
    if not isinstance(md.planner_data, (dict, type(None))):
        _fail("planner_data is not a mapping")
    for key, value in (md.planner_data or {}).items():
        if not (isinstance(key, str) and isinstance(value, tuple) and all(isinstance(p, (str, int)) for p in value)):
            _fail(f"planner_data entry {str(key)[:100]!r} is not a path of names and indices")


def _check_tensor(fqn: str, item: Any) -> None:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties

    if type(item.properties) is not TensorProperties or not isinstance(item.properties.dtype, torch.dtype):
        _fail(f"tensor {fqn[:100]!r} has no dtype")
    if not _is_shape(item.size) or not isinstance(item.chunks, list):
        _fail(f"tensor {fqn[:100]!r} has no valid shape and chunk list")
    for chunk in item.chunks:
        if type(chunk) is not ChunkStorageMetadata or not (_is_shape(chunk.offsets) and _is_shape(chunk.sizes)):
            _fail(f"a chunk of tensor {fqn[:100]!r} is not an offset and size")
        inside = len(chunk.offsets) == len(chunk.sizes) == len(item.size) and all(
            o + s <= n for o, s, n in zip(chunk.offsets, chunk.sizes, item.size, strict=True)
        )
        if not inside:
            _fail(f"a chunk of tensor {fqn[:100]!r} lies outside its shape {list(item.size)}")


def _is_shape(value: Any) -> bool:
    return isinstance(value, torch.Size) and all(isinstance(n, int) and 0 <= n < 2**63 for n in value)


def _check_storage(fqn: str, info: Any, manifest: Manifest) -> None:
    """A shard reference must name a file of this checkpoint's manifest (never `..`, never absolute)."""
    relative = info.relative_path
    try:
        check_relative_path(relative)
    except ManifestError as exc:
        _fail(f"the storage of {fqn[:100]!r} is outside the checkpoint: {exc.reason}")
    entry = manifest.files.get(f"{SHARDED_DIR}/{relative}")
    if entry is None or relative == DCP_METADATA:
        _fail(f"the storage of {fqn[:100]!r} is {relative[:100]!r}, which the manifest does not list as a shard file")
    offset, length = info.offset, info.length
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (offset, length)):
        _fail(f"the storage of {fqn[:100]!r} has no integer offset and length")
    if not (offset >= 0 and length >= 0 and offset + length <= entry.size):
        _fail(f"the storage of {fqn[:100]!r} lies outside {relative} ({entry.size} bytes)")
    if info.transform_descriptors:  # compression and other DCP extensions: ckptguard writes none, loads none
        _fail(f"the storage of {fqn[:100]!r} asks for transforms {list(info.transform_descriptors)[:3]}")
