"""State objects -> a plan of files (safetensors tensors + JSON), and back.

A "state" is the caller's dict ``{name: value}``. Each value becomes one *entry*:

* ``peft``     a PEFT model: the active adapter in PEFT's own layout at the checkpoint root, so
               ``PeftModel.from_pretrained(base, checkpoint_dir)`` works on a ckptguard checkpoint;
* ``stateful`` anything with ``state_dict()`` / ``load_state_dict()`` (modules, optimizers, schedulers);
* ``value``    plain JSON-able data (and tensors), returned to the caller on restore;
* ``sharded``  an FSDP2 module or its optimizer: every rank writes its shards through DCP
               (:mod:`ckptguard.state.sharded`), outside the file plan.

``per_rank(obj)`` marks an entry that differs between ranks (RNG): every rank writes its own copy
under ``state/rank{r}/``. Everything else is replicated and written by rank 0 only.
The snapshot never mutates the caller's objects or dict.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import torch

from ckptguard.errors import UnsupportedStateError
from ckptguard.files.writer import FilePlan
from ckptguard.format import tree
from ckptguard.format.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, STATE_FILE, STATE_FORMAT_VERSION, entry_path
from ckptguard.format.lora import adapter_state, is_peft_model, unwrap_model
from ckptguard.format.manifest import encode_metrics
from ckptguard.format.tensorfile import tensor_problem
from ckptguard.state import sharded

MAX_ENTRY_NAME = 64
_NAME = re.compile(rf"^[A-Za-z0-9_.-]{{1,{MAX_ENTRY_NAME}}}$")
_CLASS_CHECKED = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)


@dataclass(frozen=True)
class PerRank:
    """Wrapper: this entry differs per rank (e.g. RNG state); each rank saves and restores its own."""

    obj: Any


def per_rank(obj: Any) -> PerRank:
    """Mark a state entry as per-rank: ``{"rng": per_rank(RNGState())}``."""
    return PerRank(obj)


@dataclass
class Snapshot:
    """This rank's files for one save, plus the trainer-state document (rank 0's)."""

    files: list[FilePlan] = field(default_factory=list)
    peft_model: Any = None  # the unwrapped PEFT model, for the deep adapter check
    sharded: dict[str, Any] = field(default_factory=dict)  # DCP state dicts of the sharded entries

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def inodes(self, world_size: int) -> int:
        """Inodes one save takes at most: files, their directories (per rank), staging, manifest, LATEST temp."""
        dirs = {str(PurePosixPath(f.relpath).parent) for f in self.files} - {"."}
        return world_size * (len(self.files) + len(dirs)) + 3

    def tensor_files(self) -> dict[str, dict[str, torch.Tensor]]:
        return {f.relpath: f.tensors for f in self.files if f.tensors is not None}


def entry_kind(value: Any) -> str:
    obj = value.obj if isinstance(value, PerRank) else value
    if sharded.is_sharded(obj):  # first: an FSDP2-wrapped PEFT model is sharded, not a plain adapter
        return "sharded"
    if is_peft_model(obj):
        return "peft"
    if hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
        return "stateful"
    return "value"


def check_names(state: Mapping[str, Any]) -> None:
    """Entry names become file names: keep them safe, unambiguous and short (preflight probes 64 characters)."""
    if not isinstance(state, Mapping):
        raise UnsupportedStateError(f"the state must be a dict of named entries, not {type(state).__name__}")
    for name in state:
        if not isinstance(name, str) or not _NAME.match(name) or name in ("trainer_state", "values"):
            raise UnsupportedStateError(
                f"state entry name {name!r} is not allowed: use up to {MAX_ENTRY_NAME} letters, digits, '_', '.', "
                "'-' (and not 'trainer_state' or 'values')"
            )
    if sum(entry_kind(v) == "peft" for v in state.values()) > 1:
        raise UnsupportedStateError("state holds more than one PEFT model; save each in its own manager")


def class_name(obj: Any) -> str | None:
    """The class recorded for optimizers and schedulers, whose state dicts look alike across classes."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}" if isinstance(obj, _CLASS_CHECKED) else None


def check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    """Metrics as floats; a non-finite one (a diverged loss) is kept, and retention never calls it best."""
    out = {}
    for key, value in (metrics or {}).items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            raise UnsupportedStateError(f"metric {key!r} is {value!r}, not a number") from None
    return out


def take(state: Mapping[str, Any], *, step: int, metrics: Mapping[str, float], rank: int, world_size: int) -> Snapshot:
    """Flatten `state` into this rank's file plan. Rank 0 also writes replicated entries.

    Everything that would make a write fail is checked here, before any file exists, the same way
    for blocking and background saves: UnsupportedStateError names the entry and the tensor.
    """
    check_names(state)
    snap = Snapshot()
    # First, before any user code can fail on one rank and leave the others waiting in this collective:
    # every rank sends its shards of a sharded PEFT model, rank 0 keeps the full adapter (PEFT layout)
    snap.sharded = sharded.state_dicts(state)
    gathered = sharded.full_adapter(state)
    if gathered is not None and rank == 0:
        snap.files.extend(peft_files(*gathered))
    entries: dict[str, Any] = {}
    for name, value in state.items():
        is_per_rank = isinstance(value, PerRank)
        record: dict[str, Any] = {"kind": entry_kind(value), "per_rank": is_per_rank}
        entries[name] = record
        if record["kind"] == "sharded":
            if is_per_rank:
                raise UnsupportedStateError(f"state entry {name!r} is sharded already: do not wrap it in per_rank()")
            continue
        if is_per_rank or rank == 0:
            try:
                _take_entry(snap, name, value.obj if is_per_rank else value, record, rank)
            except (TypeError, ValueError) as exc:  # tree.encode / json.dumps on values they cannot hold
                raise UnsupportedStateError(f"state entry {name!r} cannot be saved: {exc}") from exc
    for plan in snap.files:
        for key, tensor in (plan.tensors or {}).items():
            problem = tensor_problem(tensor)
            if problem is not None:
                raise UnsupportedStateError(f"tensor {key!r} of {plan.relpath} {problem}")
    if rank == 0:
        doc = {
            "format_version": STATE_FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "metrics": encode_metrics(metrics),
            "entries": entries,
        }
        snap.files.append(FilePlan(STATE_FILE, data=_json_bytes(doc)))
    return snap


def _take_entry(snap: Snapshot, name: str, obj: Any, record: dict[str, Any], rank: int) -> None:
    if record["kind"] == "peft":
        snap.peft_model = unwrap_model(obj)
        snap.files.extend(peft_files(snap.peft_model))
        return
    raw = obj.state_dict() if record["kind"] == "stateful" else obj
    if class_name(obj) is not None:
        record["class"] = class_name(obj)
    tensors: dict[str, torch.Tensor] = {}
    encoded = tree.encode(raw, tensors)
    prefix = entry_path(name, rank=rank if record["per_rank"] else None)
    if tensors:
        snap.files.append(FilePlan(f"{prefix}.safetensors", tensors=tensors))
    if record["per_rank"]:
        snap.files.append(FilePlan(f"{prefix}.json", data=_json_bytes({"tree": encoded})))
    else:
        record["tree"] = encoded


def _json_bytes(doc: Any) -> bytes:
    try:
        return (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not JSON-serialisable: {exc}") from None


def peft_files(model: Any, state_dict: dict[str, Any] | None = None) -> list[FilePlan]:
    """The adapter weights and config of a PEFT model's active adapter, as PEFT lays them out."""
    weights, config = adapter_state(model, state_dict)
    return [FilePlan(ADAPTER_WEIGHTS, tensors=weights), FilePlan(ADAPTER_CONFIG, data=config)]


def estimate_bytes(state: Mapping[str, Any]) -> int:
    """Bytes one checkpoint of `state` takes now (all ranks' copies of per-rank entries excluded)."""
    return take(state, step=0, metrics={}, rank=0, world_size=1).nbytes + 4096
