"""Checkpoint -> state objects, in two phases so a damaged checkpoint never half-loads.

Phase 1 (:func:`open_checkpoint`, then :func:`read_objects`) reads every file this rank needs once,
checks its size and xxh3-128 against the manifest, parses it (safetensors, strict JSON) and decodes
the trees; nothing of the caller's is touched. Phase 2 (:func:`apply`) calls ``load_state_dict`` on
each object. Any problem in phase 1 is a CorruptCheckpointError naming the file, and resume moves on
to the previous checkpoint with the caller's objects unchanged. Nothing is unpickled.
:func:`restore_into` runs the phases over the candidates discovery names, agreeing between ranks.
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
from ckptguard.format.layout import ADAPTER_WEIGHTS, STATE_FILE, entry_path
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


@dataclass
class LoadedCheckpoint:
    """Everything phase 1 read and checked, ready to apply."""

    path: Path
    manifest: Manifest
    step: int
    metrics: dict[str, float]
    entries: dict[str, Any] = field(default_factory=dict)  # trainer_state.json's record of each entry
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
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise CorruptCheckpointError(f"{STATE_FILE} has no 'entries' object", path=path)
    if doc.get("step") != manifest.step or manifest.step is None:
        raise CorruptCheckpointError(
            f"{STATE_FILE} records step {doc.get('step')!r}, but the manifest says step {manifest.step}", path=path
        )
    loaded = LoadedCheckpoint(
        path=path, manifest=manifest, step=manifest.step, metrics=dict(manifest.metrics), entries=entries
    )
    for name, value in state.items():
        record = entries.get(name)
        if not isinstance(record, dict):
            raise CheckpointError(
                f"checkpoint has no entry {name!r} (it holds {sorted(entries)})",
                path=path,
                remedy="Restore with the same state keys the run saved, or start a new run directory.",
            )
        kind = entry_kind(value)
        if record.get("kind") != kind or bool(record.get("per_rank")) != isinstance(value, PerRank):
            raise CheckpointError(
                f"entry {name!r} was saved as {record.get('kind')} (per_rank={record.get('per_rank')}) "
                f"but is restored as {kind} (per_rank={isinstance(value, PerRank)})",
                path=path,
                remedy="Pass the same kind of object that was saved under this name.",
            )
        if kind == "value":
            loaded.objects[name] = _decode_entry(path, manifest, name, record, rank)
    return loaded


def read_objects(loaded: LoadedCheckpoint, state: Mapping[str, Any], *, rank: int) -> None:
    """Phase 1b: read, hash-check and decode the tensors of stateful entries and the adapter."""
    path, manifest = loaded.path, loaded.manifest
    if sharded.any_sharded(state):
        loaded.dcp_metadata = sharded.check_files(path, manifest)
        sharded.check_fit(path, state, loaded.dcp_metadata)
    for name, value in state.items():
        kind = entry_kind(value)
        if kind == "peft":
            data = _bytes(path, manifest, ADAPTER_WEIGHTS)
            loaded.adapter = checked_adapter_tensors(value, data, ADAPTER_WEIGHTS, path)
        elif kind == "stateful":
            record = loaded.entries[name]
            loaded.objects[name] = saved = _decode_entry(path, manifest, name, record, rank)
            obj = value.obj if isinstance(value, PerRank) else value
            check_fits(name, obj, saved, record.get("class"), path)


def _decode_entry(path: Path, manifest: Manifest, name: str, record: dict[str, Any], rank: int) -> Any:
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


def plain_values(loaded: LoadedCheckpoint, state: Mapping[str, Any]) -> dict[str, Any]:
    """The plain (JSON-able) entries of `state` as the checkpoint holds them."""
    return {name: loaded.objects[name] for name, value in state.items() if entry_kind(value) == "value"}


def read_values(path: str | os.PathLike[str], names: list[str]) -> dict[str, Any]:
    """Hash-checked plain values of a checkpoint (its stored config, say), without a manager or lock."""
    return plain_values(open_checkpoint(Path(path), dict.fromkeys(names), rank=0), dict.fromkeys(names))


def apply(loaded: LoadedCheckpoint, state: Mapping[str, Any]) -> None:
    """Phase 2: load into the caller's objects (modules, optimizers, adapters...).

    Modules, optimizers and adapters were checked in phase 1 and load last. Other stateful objects
    (schedulers, user classes) cannot be checked ahead: they load first, each one's previous state
    kept, so if one refuses, those already loaded are put back and nothing of the caller's changed.
    """
    checked = (torch.nn.Module, torch.optim.Optimizer)
    order = sorted(state, key=lambda n: entry_kind(state[n]) == "peft" or isinstance(_obj(state[n]), checked))
    undo: list[tuple[Any, Any]] = []
    for name in order:
        obj, kind = _obj(state[name]), entry_kind(state[name])
        try:
            if kind == "peft":
                apply_adapter(obj, loaded.adapter or {})
            elif kind == "sharded":
                sharded.apply_entry(state, name, loaded.objects[name])
            elif kind == "stateful":
                if not isinstance(obj, checked):
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


def _obj(value: Any) -> Any:
    return value.obj if isinstance(value, PerRank) else value


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
        if sharded.any_sharded(state):  # a collective: DCP reads, reshards
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
        result = Restored(loaded.step, loaded.path, plain_values(loaded, state), loaded.metrics)
        if check is not None:  # may refuse (raise) before any large file is read
            check(result)
        read_objects(loaded, state, rank=coord.rank)
    except CheckpointError as exc:
        error = exc
    coord.agree(error, None)
    assert loaded is not None and result is not None
    return loaded, result
