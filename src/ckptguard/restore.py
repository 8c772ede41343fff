"""Checkpoint -> state objects, in two phases so a damaged checkpoint never half-loads.

Phase 1 (:func:`read_checkpoint`) reads every file this rank needs once, checks its size and
xxh3-128 against the manifest, parses it (safetensors, strict JSON) and decodes the trees; nothing of
the caller's is touched. Phase 2 (:func:`apply`) calls ``load_state_dict`` on each object. Any
problem in phase 1 is a CorruptCheckpointError naming the file, and resume moves on to the previous
checkpoint with the caller's objects unchanged. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from ckptguard import tree
from ckptguard.errors import CheckpointError, CorruptCheckpointError
from ckptguard.lora import apply_adapter, checked_adapter_tensors
from ckptguard.manifest import Manifest, ManifestError
from ckptguard.snapshot import ADAPTER_WEIGHTS, STATE_FILE, PerRank, check_names, entry_kind
from ckptguard.verify import read_verified, verify_checkpoint


@dataclass
class LoadedCheckpoint:
    """Everything phase 1 read and checked, ready to apply."""

    path: Path
    manifest: Manifest
    step: int
    metrics: dict[str, float]
    entries: dict[str, Any] = field(default_factory=dict)  # trainer_state.json's record of each entry
    adapter: dict[str, torch.Tensor] | None = None
    objects: dict[str, Any] = field(default_factory=dict)  # entry name -> decoded state_dict / value


def read_checkpoint(path: Path, state: Mapping[str, Any], *, rank: int) -> LoadedCheckpoint:
    """Phase 1 in full: :func:`open_checkpoint` then :func:`read_objects`."""
    loaded = open_checkpoint(path, state, rank=rank)
    read_objects(loaded, state, rank=rank)
    return loaded


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
    loaded = LoadedCheckpoint(
        path=path,
        manifest=manifest,
        step=int(doc.get("step", manifest.step or 0)),
        metrics=dict(manifest.metrics),
        entries=entries,
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
    for name, value in state.items():
        kind = entry_kind(value)
        if kind == "peft":
            loaded.adapter = checked_adapter_tensors(value, _bytes(path, manifest, ADAPTER_WEIGHTS), path)
        elif kind == "stateful":
            loaded.objects[name] = _decode_entry(path, manifest, name, loaded.entries[name], rank)


def _decode_entry(path: Path, manifest: Manifest, name: str, record: dict[str, Any], rank: int) -> Any:
    if record.get("per_rank"):
        prefix = f"state/rank{rank}/{name}"
        if f"{prefix}.json" not in manifest.files:
            raise CheckpointError(
                f"checkpoint holds no per-rank entry {name!r} for rank {rank} "
                f"(it was saved by {manifest.world_size} ranks)",
                path=path,
                remedy=f"Resume with {manifest.world_size} processes, as the run was saved.",
            )
        encoded = _json(path, manifest, f"{prefix}.json").get("tree")
    else:
        prefix = f"state/{name}"
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
        doc = json.loads(_bytes(path, manifest, relpath))
    except ValueError as exc:
        raise CorruptCheckpointError(f"{relpath} is not valid JSON ({exc})", path=path / relpath) from exc
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{relpath} is not a JSON object", path=path / relpath)
    return doc


def _tensors(path: Path, manifest: Manifest, relpath: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(_bytes(path, manifest, relpath))
    except CorruptCheckpointError:
        raise
    except Exception as exc:  # the safetensors library's own validation of the header
        raise CorruptCheckpointError(f"{relpath} is not a valid safetensors file ({exc})", path=path) from exc


def plain_values(loaded: LoadedCheckpoint, state: Mapping[str, Any]) -> dict[str, Any]:
    """The plain (JSON-able) entries of `state` as the checkpoint holds them."""
    return {name: loaded.objects[name] for name, value in state.items() if entry_kind(value) == "value"}


def read_values(path: str | os.PathLike[str], names: list[str]) -> dict[str, Any]:
    """Hash-checked plain values of a checkpoint (its stored config, say), without a manager or lock."""
    return plain_values(open_checkpoint(Path(path), dict.fromkeys(names), rank=0), dict.fromkeys(names))


def apply(loaded: LoadedCheckpoint, state: Mapping[str, Any]) -> None:
    """Phase 2: load into the caller's objects (modules, optimizers, adapters...)."""
    for name, value in state.items():
        obj = value.obj if isinstance(value, PerRank) else value
        kind = entry_kind(value)
        if kind == "peft":
            apply_adapter(obj, loaded.adapter or {})
        elif kind == "stateful":
            obj.load_state_dict(loaded.objects[name])
