"""Checkpoint -> state objects, in two phases so a damaged checkpoint never half-loads.

Phase 1 (:func:`open_checkpoint`, then :func:`read_objects`) classifies each entry of the caller's
state once (an :class:`Entry`: its kind, and what the checkpoint recorded of it), then reads every
file this rank needs once, checks its size and xxh3-128 against the manifest, parses it
(safetensors, strict JSON) and decodes the trees; nothing of the caller's is touched. Phase 2
(:func:`apply`) calls ``load_state_dict`` on each object. Any problem in phase 1 is a
CorruptCheckpointError naming the file, and resume moves on to the previous checkpoint with the
caller's objects unchanged. Nothing is unpickled. :func:`restore_into` runs the phases over the
candidates discovery names, agreeing between ranks.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptguard.catalog.verify import read_verified, verify_checkpoint
from ckptguard.dist import Coordinator
from ckptguard.errors import CheckpointError, CorruptCheckpointError
from ckptguard.files.events import EventLog
from ckptguard.format import tree
from ckptguard.format.layout import ADAPTER_WEIGHTS, STATE_FILE, STATE_FORMAT_VERSION, entry_path
from ckptguard.format.lora import apply_adapter, checked_adapter_tensors
from ckptguard.format.manifest import Manifest, ManifestError, parse_json
from ckptguard.format.tensorfile import parse_tensors
from ckptguard.s3.objectstore import is_remote
from ckptguard.state import sharded
from ckptguard.state.fit import check_fits
from ckptguard.state.snapshot import PerRank, check_names, entry_kind

log = logging.getLogger("ckptguard")


@dataclass(frozen=True)
class Restored:
    """What restore loaded: the step, from where, the plain values of the state, the saved metrics."""

    step: int
    path: Path
    values: dict[str, Any]
    metrics: dict[str, float]


@dataclass(frozen=True)
class Entry:
    """One named entry of the caller's state, classified once, against the checkpoint's record of it."""

    name: str
    obj: Any  # the object to load into (a per_rank() wrapper looked through), or a plain value's placeholder
    kind: str  # value, stateful, peft or sharded (:func:`ckptguard.state.snapshot.entry_kind`)
    record: dict[str, Any]  # trainer_state.json's record of it: kind, per_rank, tree, class

    @property
    def checked_ahead(self) -> bool:
        """Phase 1 proved it will load (an adapter, a module, an optimizer); others may still refuse in phase 2."""
        return self.kind == "peft" or isinstance(self.obj, (torch.nn.Module, torch.optim.Optimizer))


@dataclass
class LoadedCheckpoint:
    """Everything phase 1 read and checked, ready to apply."""

    path: Path
    manifest: Manifest
    step: int
    metrics: dict[str, float]
    records: dict[str, Any] = field(default_factory=dict)  # trainer_state.json's record of every saved entry
    plan: list[Entry] = field(default_factory=list)  # the caller's entries, in the caller's order
    sharded: bool = False  # the state holds a sharded entry: DCP reads it, a collective
    adapter: dict[str, torch.Tensor] | None = None
    dcp_metadata: Any = None  # DCP's index of the shards, checked (a sharded state only)
    objects: dict[str, Any] = field(default_factory=dict)  # entry name -> decoded state_dict / value


def open_checkpoint(path: Path, state: Mapping[str, Any], *, rank: int) -> LoadedCheckpoint:
    """Phase 1a: validate the structure against `state` and decode its plain values (cheap).

    The caller can look at step, metrics and plain values (a stored config) and refuse the
    checkpoint before any large tensor file is read.
    """
    check_names(state)
    report = verify_checkpoint(path, "quick")
    if not report.ok or report.manifest is None:
        raise CorruptCheckpointError(f"checkpoint is not valid: {report.reason}", path=path)
    manifest = report.manifest
    doc = _json(path, manifest, STATE_FILE)
    if doc.get("format_version") != STATE_FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{STATE_FILE} has format_version {str(doc.get('format_version'))[:20]}; this ckptguard reads "
            f"{STATE_FORMAT_VERSION} (a checkpoint written by another version of ckptguard, or damaged)",
            path=path / STATE_FILE,
        )
    records = doc.get("entries")
    if not isinstance(records, dict):
        raise CorruptCheckpointError(f"{STATE_FILE} has no 'entries' object", path=path)
    if doc.get("step") != manifest.step or manifest.step is None:
        raise CorruptCheckpointError(
            f"{STATE_FILE} records step {doc.get('step')!r}, but the manifest says step {manifest.step}", path=path
        )
    loaded = LoadedCheckpoint(
        path=path, manifest=manifest, step=manifest.step, metrics=dict(manifest.metrics), records=records
    )
    loaded.plan = [_classify(path, records, name, value) for name, value in state.items()]
    loaded.sharded = any(e.kind == "sharded" for e in loaded.plan)
    for entry in loaded.plan:
        if entry.kind == "value":
            loaded.objects[entry.name] = _decode_entry(path, manifest, entry, rank)
    return loaded


def _classify(path: Path, records: dict[str, Any], name: str, value: Any) -> Entry:
    """The caller's entry `name` as an :class:`Entry`; CheckpointError where the checkpoint saved it otherwise."""
    record = records.get(name)
    if not isinstance(record, dict):
        raise CheckpointError(
            f"checkpoint has no entry {name!r} (it holds {sorted(records)})",
            path=path,
            remedy="Restore with the same state keys the run saved, or start a new run directory.",
        )
    kind, per_rank = entry_kind(value), isinstance(value, PerRank)
    if record.get("kind") != kind or bool(record.get("per_rank")) != per_rank:
        raise CheckpointError(
            f"entry {name!r} was saved as {record.get('kind')} (per_rank={record.get('per_rank')}) "
            f"but is restored as {kind} (per_rank={per_rank})",
            path=path,
            remedy="Pass the same kind of object that was saved under this name.",
        )
    return Entry(name, value.obj if per_rank else value, kind, record)


def read_objects(loaded: LoadedCheckpoint, state: Mapping[str, Any], *, rank: int) -> None:
    """Phase 1b: read, hash-check and decode the tensors of stateful entries and the adapter."""
    path, manifest = loaded.path, loaded.manifest
    if loaded.sharded:
        loaded.dcp_metadata = sharded.check_files(path, manifest)
        sharded.check_fit(path, state, loaded.dcp_metadata)
    for entry in loaded.plan:
        if entry.kind == "peft":
            data = _bytes(path, manifest, ADAPTER_WEIGHTS)
            loaded.adapter = checked_adapter_tensors(entry.obj, data, ADAPTER_WEIGHTS, path)
        elif entry.kind == "stateful":
            loaded.objects[entry.name] = saved = _decode_entry(path, manifest, entry, rank)
            check_fits(entry.name, entry.obj, saved, entry.record.get("class"), path)


def _decode_entry(path: Path, manifest: Manifest, entry: Entry, rank: int) -> Any:
    name, record = entry.name, entry.record
    if record.get("per_rank"):
        prefix = entry_path(name, rank=rank)
        if f"{prefix}.json" not in manifest.files:
            raise CheckpointError(
                f"checkpoint holds no per-rank entry {name!r} for rank {rank} "
                f"(it was saved by {manifest.world_size} ranks)",
                path=path,
                remedy=f"Resume with {manifest.world_size} processes, as the run was saved.",
            )
        encoded = _json(path, manifest, f"{prefix}.json").get("tree")
    else:
        prefix = entry_path(name)
        encoded = record.get("tree")
    tensors: dict[str, torch.Tensor] = {}
    if f"{prefix}.safetensors" in manifest.files:
        tensors = _tensors(path, manifest, f"{prefix}.safetensors")
    try:
        return tree.decode(encoded, tensors)
    except tree.TreeError as exc:
        raise CorruptCheckpointError(f"entry {name!r} cannot be decoded: {exc}", path=path) from exc


def _bytes(path: Path, manifest: Manifest, relpath: str) -> bytes:
    entry = manifest.files.get(relpath)
    if entry is None:
        raise CorruptCheckpointError(f"{relpath} is not listed in the manifest", path=path)
    try:
        return read_verified(path / relpath, entry)
    except ManifestError as exc:
        raise CorruptCheckpointError(f"{relpath}: {exc.reason}", path=path / relpath) from exc
    except OSError as exc:
        raise CorruptCheckpointError(f"{relpath} cannot be read ({exc.strerror})", path=path / relpath) from exc


def _json(path: Path, manifest: Manifest, relpath: str) -> Any:
    try:
        doc = parse_json(_bytes(path, manifest, relpath), relpath)
    except ManifestError as exc:
        raise CorruptCheckpointError(exc.reason, path=path / relpath) from exc
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{relpath} is not a JSON object", path=path / relpath)
    return doc


def _tensors(path: Path, manifest: Manifest, relpath: str) -> dict[str, torch.Tensor]:
    return parse_tensors(_bytes(path, manifest, relpath), relpath, where=path)


def plain_values(loaded: LoadedCheckpoint) -> dict[str, Any]:
    """The plain (JSON-able) entries of the caller's state as the checkpoint holds them."""
    return {e.name: loaded.objects[e.name] for e in loaded.plan if e.kind == "value"}


def read_values(path: str | os.PathLike[str], names: list[str]) -> dict[str, Any]:
    """Hash-checked plain values of a checkpoint (its stored config, say), without a manager or lock."""
    return plain_values(open_checkpoint(Path(path), dict.fromkeys(names), rank=0))


def apply(loaded: LoadedCheckpoint, state: Mapping[str, Any]) -> None:
    """Phase 2: load into the caller's objects (modules, optimizers, adapters...).

    Modules, optimizers and adapters were checked in phase 1 and load last. Other stateful objects
    (schedulers, user classes) cannot be checked ahead: they load first, each one's previous state
    kept, so if one refuses, those already loaded are put back and nothing of the caller's changed.
    """
    undo: list[tuple[Any, Any]] = []
    for entry in sorted(loaded.plan, key=lambda e: e.checked_ahead):
        obj, name = entry.obj, entry.name
        try:
            if entry.kind == "peft":
                apply_adapter(obj, loaded.adapter or {})
            elif entry.kind == "sharded":
                sharded.apply_entry(state, name, loaded.objects[name])
            elif entry.kind == "stateful":
                if not entry.checked_ahead:
                    undo.append((obj, copy.deepcopy(obj.state_dict())))
                obj.load_state_dict(loaded.objects[name])
        except Exception as exc:  # user objects' load_state_dict can raise anything
            for done, previous in reversed(undo):  # the failed one too: it may have half-loaded
                try:
                    done.load_state_dict(previous)
                except Exception as again:  # an object that refuses even its own state: say so, go on
                    log.warning("could not put back the previous state of %r: %s", done, again)
            raise CheckpointError(
                f"entry {name!r} refused the saved state ({type(exc).__name__}: {exc}); nothing was changed",
                path=loaded.path,
                remedy="Restore into objects built as the run that saved them built theirs.",
            ) from exc


def restore_into(
    state: Mapping[str, Any],
    candidates: list[str],
    *,
    coord: Coordinator,
    events: EventLog,
    explicit: bool,
    check: Callable[[Restored], None] | None,
    fetch: Callable[[str], str],
) -> Restored | None:
    """Try `candidates` in order; load the first one every rank can read into `state`.

    A candidate that is a URL is first fetched into the local tier by rank 0 (``fetch``, which raises
    CorruptCheckpointError for one that cannot be had intact). A damaged candidate (that error on any
    rank) is skipped with a warning, unless it was named explicitly and is the last way to have it;
    any other error (a mismatch with the caller's objects, a refusal by `check`) raises on every rank.
    Nothing of the caller's changes until every rank has read and checked all it needs.
    """
    for number, candidate in enumerate(candidates, start=1):
        try:
            loaded, result = _read_candidate(state, candidate, coord=coord, check=check, fetch=fetch)
        except CorruptCheckpointError as exc:
            if explicit and number == len(candidates):
                raise
            log.warning("skipping %s: %s", candidate, exc)
            events.emit("resume_skip", path=candidate, reason=str(exc))
            continue
        if loaded.sharded:  # a collective: DCP reads, reshards
            loaded.objects.update(sharded.load(loaded.path, state, loaded.dcp_metadata, coord=coord))
        apply(loaded, state)
        events.emit("resume", step=loaded.step, path=loaded.path)
        return result
    return None  # (a named checkpoint that fails raised above)


def _read_candidate(
    state: Mapping[str, Any],
    candidate: str,
    *,
    coord: Coordinator,
    check: Callable[[Restored], None] | None,
    fetch: Callable[[str], str],
) -> tuple[LoadedCheckpoint, Restored]:
    """Phase 1 of one candidate on every rank, ending in agreement: all have it read and checked, or all raise."""
    loaded, result, error = None, None, None
    try:
        if is_remote(candidate):
            candidate = coord.on_primary(lambda: fetch(candidate))
        loaded = open_checkpoint(Path(candidate), state, rank=coord.rank)
        result = Restored(loaded.step, loaded.path, plain_values(loaded), loaded.metrics)
        if check is not None:  # may refuse (raise) before any large file is read
            check(result)
        read_objects(loaded, state, rank=coord.rank)
    except CheckpointError as exc:
        error = exc
    coord.agree(error, None)
    assert loaded is not None and result is not None
    return loaded, result
