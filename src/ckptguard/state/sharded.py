"""Sharded state (FSDP2 modules and their optimizers) saved and loaded with torch.distributed.checkpoint.

DCP is the engine; the commit protocol stays ours. Every rank writes its shard files into
``sharded/`` of the one staging directory rank 0 created, through a storage writer whose files are
created exclusively (DCP never overwrites anything, committed or not), hashed with xxh3-128 as the
bytes go out (DCP writes each file front to back; a seek would make the hash a lie, so the stream
refuses it) and fsynced; once closed, each file is read back and hashed again while the disk syncs
it (the rank's re-read before the ranks agree, :func:`ckptguard.catalog.verify.check_written`, so it costs
no time of its own beside the fsync). The digests go to the committing rank with the other files' entries, and
the manifest lists each shard file with the rank that wrote it. Loading goes through DCP too, so a
checkpoint saved by N ranks loads on M: each rank asks for the slices its own sharding needs.

DCP's ``CheckpointException`` is a BaseException (``except Exception`` misses it): it is turned
into a ckptguard error here, on every rank. Nothing is unpickled beyond DCP's metadata, which
:mod:`ckptguard.format.dcp_metadata` decodes as hostile input, and non-tensor values load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash

from ckptguard.catalog.verify import hash_mismatch, read_verified, size_mismatch
from ckptguard.errors import CheckpointError, CorruptCheckpointError, UnsupportedStateError, WriteError, from_os_error
from ckptguard.files.durable import WRITEBACK_EVERY, advance_writeback, fsync_file
from ckptguard.files.hashing import hash_file
from ckptguard.format import dcp_metadata
from ckptguard.format.layout import DCP_METADATA, SHARDED_DIR
from ckptguard.format.lora import adapter_source_keys, is_peft_model
from ckptguard.format.manifest import FileEntry, Manifest, ManifestError
from ckptguard.units import format_bytes

log = logging.getLogger("ckptguard")


def is_fsdp_module(obj: Any) -> bool:
    """A module `fully_shard` wrapped (checked without importing FSDP, which no other run needs)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(obj, fsdp.FSDPModule)


def is_sharded(obj: Any) -> bool:
    """An FSDP2 module, or an optimizer over DTensor parameters (an FSDP2 module's)."""
    if is_fsdp_module(obj):
        return True
    tensor = sys.modules.get("torch.distributed.tensor")
    return (
        tensor is not None
        and isinstance(obj, torch.optim.Optimizer)
        and any(isinstance(p, tensor.DTensor) for group in obj.param_groups for p in group["params"])
    )


def any_sharded(state: Mapping[str, Any]) -> bool:
    """Whether `state` holds a sharded entry (per_rank() wrappers looked through): restore then reads with DCP."""
    return any(is_sharded(getattr(value, "obj", value)) for value in state.values())


def _owner(state: Mapping[str, Any], name: str, optim: torch.optim.Optimizer) -> torch.nn.Module:
    """The FSDP2 module of `state` whose parameters `optim` updates (DCP needs it for the optimizer's keys)."""
    first = next(p for group in optim.param_groups for p in group["params"])
    for value in state.values():
        if is_fsdp_module(value) and any(p is first for p in value.parameters()):  # type: ignore[attr-defined]
            return value  # type: ignore[return-value]
    raise UnsupportedStateError(
        f"state entry {name!r} is an optimizer over sharded parameters, but no FSDP2 module in the state owns them",
        remedy="Save the fully_shard()-ed model in the same state dict as its optimizer.",
    )


def _options(**full: bool) -> Any:
    """Frozen parameters (a LoRA run's base model) are the user's to load, never part of a checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **full)


def state_dicts(state: Mapping[str, Any]) -> dict[str, Any]:
    """DCP state dicts of the sharded entries of `state` (views of the live shards, not copies)."""
    names = [name for name, value in state.items() if is_sharded(value)]
    if not names:  # DCP's state_dict module takes seconds to import: only runs that shard pay for it
        return {}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out: dict[str, Any] = {}
    for name in names:
        value = state[name]
        if is_fsdp_module(value):
            out[name] = get_model_state_dict(value, options=_options())
        else:
            out[name] = get_optimizer_state_dict(_owner(state, name, value), value)
    return out


def full_adapter(state: Mapping[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """The sharded PEFT model of `state` and the full tensors of its adapter, on the CPU of rank 0 (a collective).

    Only what PEFT puts in an adapter is gathered (:func:`ckptguard.format.lora.adapter_source_keys`), never
    the frozen base model: a save of a 3B model's LoRA moves megabytes to rank 0, not gigabytes. Where
    PEFT's choice cannot be traced to keys, the whole model is gathered for it to choose from, and a
    warning says so once per model, with the bytes that costs each save.
    """
    for value in state.values():
        if is_fsdp_module(value) and is_peft_model(value):
            local = value.state_dict()  # DTensor shards: nothing gathered yet
            keys = adapter_source_keys(value, local)
            if keys is None:
                return value, _full_model(value, local)
            primary = torch.distributed.get_rank() == 0
            full = {}
            for key in keys:  # the same order on every rank: one all-gather per tensor
                tensor = local[key]
                tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                if primary:
                    full[key] = tensor.detach().cpu()
            return value, full
    return None


_warned_whole_gather: weakref.WeakSet[Any] = weakref.WeakSet()


def _full_model(model: Any, local: Mapping[str, Any]) -> dict[str, Any]:
    """Every tensor of `model` gathered to rank 0's CPU, for PEFT to choose its adapter from (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if model not in _warned_whole_gather:
        _warned_whole_gather.add(model)
        nbytes = sum(v.numel() * v.element_size() for v in local.values() if isinstance(v, torch.Tensor))
        log.warning(
            "the PEFT adapter's tensors could not be traced to the model's state dict keys, so every save "
            "gathers the whole model to rank 0 (%s, %d tensors) for PEFT to choose from; the adapter saved is "
            "still PEFT's own",
            format_bytes(nbytes),
            len(local),
        )
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def copy_shards(sd: dict[str, Any]) -> dict[str, Any]:
    """A copy of state dicts that no training step can change (a background save; a restore loads into one).

    Tensors are copied on their own device; DCP moves each to the host as it writes it.
    """
    if not sd:
        return sd
    from torch.utils._pytree import tree_map_only

    return tree_map_only(torch.Tensor, lambda t: t.detach().clone(), sd)


# ---- writing ------------------------------------------------------------------------------------


class _HashingStream(io.RawIOBase):
    """A write-only file that hashes every byte as it passes; refuses to seek, so the hash is the file."""

    def __init__(self, raw: io.BufferedWriter) -> None:
        super().__init__()
        self._raw = raw
        self._hasher = xxhash.xxh3_128()
        self.size = self._started = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._raw.write(view)  # a BufferedWriter writes everything or raises
        self._hasher.update(view)
        self.size += len(view)
        if self.size - self._started >= WRITEBACK_EVERY:  # the disk works while the rest is written, so
            self._raw.flush()  # the fsync at the close finds little left (DCP's own writer leaves it all)
            self._started = advance_writeback(self._raw.fileno(), self._started, self.size)
        return len(view)

    def tell(self) -> int:
        return self.size

    def seek(self, *args: Any) -> int:
        raise io.UnsupportedOperation(
            "a hashed checkpoint stream is written front to back; seeking would break its hash"
        )

    def fileno(self) -> int:
        return self._raw.fileno()

    def flush(self) -> None:
        self._raw.flush()

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


def _writer(staging: Path, rank: int, on_written: Callable[[], None], reader: ThreadPoolExecutor | None) -> Any:
    """A FileSystemWriter into ``staging/sharded`` whose files are new, hashed as written and fsynced; with a
    `reader`, each file is read back and hashed on it while it is fsynced (``fs.rereads``), DCP's metadata
    decoded on it too (``fs.decoded``)."""
    from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter

    class HashingFileSystem(FileSystem):
        def __init__(self) -> None:
            self.entries: dict[str, FileEntry] = {}
            self.rereads: dict[str, Future[tuple[int, str]]] = {}
            self.decoded: dict[str, Future[Any]] = {}
            self._lock = threading.Lock()

        @contextmanager
        def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[io.IOBase]:
            if mode != "wb":
                raise ValueError(f"the checkpoint writer only creates files, not mode {mode!r}")
            with open(path, "xb") as raw:  # never replaces a file: staging is new, and stays append-only
                stream = _HashingStream(raw)
                yield stream
            # closed: read it back while the disk syncs it (an unseen writeback error reaches this fsync too)
            reread = self._read_back(Path(path)) if reader is not None else None
            fsync_file(path)
            self._record(path, FileEntry(size=stream.size, xxh3_128=stream.hexdigest(), rank=rank), reread)

        def _read_back(self, path: Path) -> Future[tuple[int, str]]:
            assert reader is not None
            if path.name != f"{DCP_METADATA}.tmp":  # a shard file
                return reader.submit(hash_file, path)
            # DCP's metadata (small; renamed next): read now, decoded on the reader while it is fsynced
            with open(path, "rb") as fh:
                data = fh.read(dcp_metadata.MAX_METADATA_BYTES + 1)
            self.decoded[_relative(path.with_name(DCP_METADATA))] = reader.submit(dcp_metadata.decode, data)
            read: Future[tuple[int, str]] = Future()
            read.set_result((len(data), xxhash.xxh3_128_hexdigest(data)))
            return read

        def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
            os.link(path, new_path)  # DCP's .metadata.tmp -> .metadata; EEXIST rather than replace a file
            with self._lock:
                entry = self.entries.pop(_relative(path))
                reread = self.rereads.pop(_relative(path), None)
            if reread is not None:
                wait([reread])  # it reads the old name
            os.unlink(path)  # publish fsyncs every staging directory before the commit
            self._record(new_path, entry, reread)

        def _record(
            self, path: str | os.PathLike[str], entry: FileEntry, reread: Future[tuple[int, str]] | None
        ) -> None:
            with self._lock:
                self.entries[_relative(path)] = entry
                if reread is not None:
                    self.rereads[_relative(path)] = reread

    def _relative(path: str | os.PathLike[str]) -> str:
        return Path(path).relative_to(staging).as_posix()

    class HashingWriter(FileSystemWriter):
        def __init__(self) -> None:
            # sync_files=False: the filesystem above fsyncs every file it closes; overwrite=False: never
            # write over an existing DCP checkpoint (the staging directory is new, so there is none)
            super().__init__(staging / SHARDED_DIR, sync_files=False, overwrite=False)
            self.fs = HashingFileSystem()

        def write_data(self, plan: Any, planner: Any) -> Any:
            written = super().write_data(plan, planner)  # synchronous: the files are on disk when it returns
            on_written()
            return written

    return HashingWriter()


@dataclass(frozen=True)
class Written:
    """What a rank's :func:`save` wrote: manifest entries and the (size, xxh3-128) each file was read back
    with once closed (for ``check_written``); on the coordinator, DCP's metadata decoded from the bytes it
    read back (the commit's verification does not decode it again), or why restore would refuse it."""

    entries: dict[str, FileEntry]
    observed: dict[str, tuple[int, str]] = field(default_factory=dict)
    decoded: dict[str, Any] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def save(staging: Path, sd: dict[str, Any], *, coord: Any, step: int, read_back: bool = True) -> Written:
    """Write this rank's shards (and, on the coordinator, DCP's metadata), read back while fsynced when
    `read_back` (each file's size and hash, the metadata decoded too); see :class:`Written`.

    A collective over the coordination group: call it on every rank. Any rank's failure raises a
    CheckpointError on all of them; a rank that dies is named by the others (CoordinationError).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    def write(written: Callable[[], None]) -> Written:
        reader = ThreadPoolExecutor(1, thread_name_prefix="ckptguard-read-back") if read_back else None
        writer = _writer(staging, coord.rank, written, reader)
        try:
            dcp.save(sd, storage_writer=writer, process_group=coord.group)
        except CheckpointException as exc:  # a BaseException: `except Exception` would let it through
            raise _typed(exc, WriteError, "could not write the sharded state", staging, step) from None
        finally:
            if reader is not None:
                reader.shutdown(wait=True)  # every read-back has ended (the metadata's decoding too)
        return _written(writer.fs)

    return coord.guarded(write, step=step, missing="never finished writing its shard files")


def _written(fs: Any) -> Written:
    """The read-backs of a finished write; a file that could not be read back is left out of ``observed``,
    so that ``check_written`` reads it again and says why."""
    done = Written(dict(fs.entries))
    for relpath, future in fs.rereads.items():
        with contextlib.suppress(OSError):
            done.observed[relpath] = future.result()
    for relpath, future in fs.decoded.items():
        try:
            done.decoded[relpath] = future.result()
        except ManifestError as exc:
            done.refused[relpath] = exc.detail
    return done


def _typed(exc: BaseException, cls: type[CheckpointError], what: str, path: Path, step: int | None) -> CheckpointError:
    """The first rank's failure inside a DCP CheckpointException, as a ckptguard error naming that rank."""
    failures = sorted(getattr(exc, "failures", {}).items())
    if not failures:
        return cls(f"{what}: {exc}", path=path, step=step)
    rank, (cause, _trace) = failures[0]
    if isinstance(cause, CheckpointError):
        error = cause
    elif isinstance(cause, OSError):
        error = from_os_error(cls, what, cause, path=cause.filename or path, step=step)
    else:
        error = cls(f"{what}: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}", path=path)
    error.step, error.rank = step, rank
    return error


# ---- reading ------------------------------------------------------------------------------------


def check_files(path: Path, manifest: Manifest) -> Any:
    """Phase 1 of a restore: every shard file's size and hash match the manifest (resharding may read any).

    Returns DCP's metadata, decoded by :mod:`ckptguard.format.dcp_metadata` from the bytes just hashed (never
    unpickled freely, never read again): a refused one makes the checkpoint corrupt, so resume falls back.
    """
    metadata = None
    for relpath, entry in sorted(manifest.files.items()):
        if not relpath.startswith(f"{SHARDED_DIR}/"):
            continue
        try:
            if relpath == dcp_metadata.METADATA_PATH:
                metadata = dcp_metadata.parse(read_verified(path / relpath, entry), manifest)
                continue
            size, digest = hash_file(path / relpath)
        except ManifestError as exc:
            reason = exc.detail
            raise CorruptCheckpointError(f"{relpath}: {reason}", path=path / relpath) from None
        except OSError as exc:
            raise CorruptCheckpointError(f"{relpath} cannot be read ({exc.strerror})", path=path / relpath) from exc
        if size != entry.size:
            raise CorruptCheckpointError(f"{relpath}: {size_mismatch(size, entry)}", path=path / relpath)
        if digest != entry.xxh3_128:
            raise CorruptCheckpointError(f"{relpath}: {hash_mismatch(digest, entry)}", path=path / relpath)
    if metadata is None:
        raise CorruptCheckpointError(f"{dcp_metadata.METADATA_PATH} is not listed in the manifest", path=path)
    return metadata


def check_fit(path: Path, state: Mapping[str, Any], metadata: Any) -> None:
    """Phase 1: every trained tensor of each FSDP2 module in `state` is in the checkpoint, with its global shape.

    Checked before DCP reads anything (DCP's own check comes after it has built the optimizer's state):
    a mismatch is the caller's objects, not a damaged checkpoint, so it raises instead of falling back.
    """
    saved = metadata.state_dict_metadata
    for name, value in state.items():
        if not is_fsdp_module(value):
            continue
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        live = {f"{name}.{k}": tuple(v.shape) for k, v in get_model_state_dict(value, options=_options()).items()}
        stored = {k: tuple(getattr(v, "size", ())) for k, v in saved.items() if k.startswith(f"{name}.")}
        missing = sorted(set(live) - set(stored))
        unexpected = sorted(set(stored) - set(live))
        shapes = sorted(k for k in set(live) & set(stored) if live[k] != stored[k])
        if missing or unexpected or shapes:
            detail = "; ".join(
                f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes))
                if keys
            )
            raise CheckpointError(
                f"entry {name!r} does not match the sharded state in the checkpoint ({detail})",
                path=path,
                remedy="Restore into a model built as the run that saved it built its own (same layers, LoRA r).",
            )


def _reader(root: Path, metadata: Any) -> Any:
    """DCP's reader, handed the metadata phase 1 checked (:mod:`ckptguard.format.dcp_metadata`), never unpickling."""
    from torch.distributed.checkpoint import FileSystemReader

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedReader(root)


def _planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        """DCP's planner, but non-tensor values load with weights_only=True (DCP's default unpickles anything)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyPlanner()


def load(path: Path, state: Mapping[str, Any], metadata: Any, *, coord: Any) -> dict[str, Any]:
    """Read the sharded entries of `state` from checkpoint `path` into copies, resharded to this run's layout.

    A collective: call it on every rank. The caller's objects are untouched until :func:`apply`: DCP
    builds a fresh optimizer's state (a step with zero gradients) to learn its keys, and a load that
    fails takes that state away again.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    fresh = [v for v in state.values() if isinstance(v, torch.optim.Optimizer) and is_sharded(v) and not v.state]
    try:
        target = copy_shards(state_dicts(state))
        reader = _reader(path / SHARDED_DIR, metadata)
        dcp.load(target, storage_reader=reader, planner=_planner(), process_group=coord.group)
    except BaseException as exc:  # CheckpointException is one (`except Exception` would let it through)
        for optim in fresh:
            optim.state.clear()
        if isinstance(exc, CheckpointException):
            raise _typed(
                exc, CheckpointError, "the sharded state does not load into this run's objects", path, None
            ) from None
        raise
    return target


def apply_entry(state: Mapping[str, Any], name: str, loaded: Any) -> None:
    """Load what :func:`load` read for entry `name` into its live FSDP2 module or optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    value = state[name]
    if is_fsdp_module(value):
        # not strict: frozen weights are not in it; DCP's load already refused a checkpoint lacking a trained one
        set_model_state_dict(value, loaded, options=_options(strict=False))
    else:
        set_optimizer_state_dict(_owner(state, name, value), value, loaded)
