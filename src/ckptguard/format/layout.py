"""The names of the on-disk format (version 1), in one place.

Every module that reads or writes a run directory or a bucket takes its names from here, so a rename
of the format is one edit and a grep for a name finds every user of it. What each name holds, and the
trees they make, are described once, in docs/format.md.
"""

from __future__ import annotations

import re

MANIFEST_NAME = "MANIFEST.json"
STATE_DIR = "state"  # in a checkpoint: the entries of the saved state (see entry_path)
STATE_FILE = f"{STATE_DIR}/trainer_state.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

LATEST_NAME = "LATEST"
LATEST_TMP_PREFIX = f".{LATEST_NAME}.tmp-"
EVENTS_NAME = "events.jsonl"
LOCK_NAME = ".ckptguard.lock"
OWNER_NAME = ".ckptguard.lock.owner"
PROBE_PREFIX = ".ckptguard-probe-"
MARKER_NAME = "COMMITTED"
LEASE_NAME = ".ckptguard.lease"

SHARDED_DIR = "sharded"  # in a checkpoint: DCP's shard files (__{rank}_{n}.distcp) of FSDP2 state
DCP_METADATA = ".metadata"  # DCP's index of the shards, in SHARDED_DIR, written by rank 0

VERIFY_LEVELS = ("quick", "full", "deep")  # verify.py's levels, named here so the CLI parser needs no torch

STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
SUPERSEDED_MARK = ".superseded-"
QUARANTINE_KINDS = ("corrupt", "unfinished")  # checkpoint-N.{kind}-<time>-<id>: a failed save, kept

# A Lightning ModelCheckpoint names its checkpoints (epoch=0-step=100.ckpt, last.ckpt); with
# VerifiedCheckpointIO each is a checkpoint directory whose step is in its manifest, not its name.
LIGHTNING_SUFFIX = ".ckpt"
LIGHTNING_PAYLOAD = "checkpoint.pt"  # in a NAME.ckpt/ directory: Lightning's checkpoint dict, as torch.save writes it
ACCELERATE_ITERATION_FILE = "ckptguard_accelerate.json"  # {"iteration": N}: Accelerate's save counter at the save
STATE_FORMAT_VERSION = 1  # trainer_state.json's "format_version"

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Accelerate's automatic naming: checkpoint_{iteration}, its save counter written as Python writes an int,
# so checkpoint_007, checkpoint_-1 and checkpoint_1e3 are nobody's checkpoint (never listed, loaded or pruned)
_ACCELERATE_NAME = re.compile(r"checkpoint_(0|[1-9][0-9]*)", re.ASCII)
_SET_ASIDE_NAME = re.compile(
    r"^(checkpoint-\d+|checkpoint_(?:0|[1-9][0-9]*))\.(superseded|corrupt|unfinished)-", re.ASCII
)


def entry_path(name: str, *, rank: int | None = None) -> str:
    """Where a state entry's files go, without their extension: ``state/NAME``, or ``state/rank{r}/NAME``
    for an entry each rank saves for itself (per_rank)."""
    return f"{STATE_DIR}/{name}" if rank is None else f"{STATE_DIR}/rank{rank}/{name}"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def step_from_name(name: str) -> int | None:
    """The step in `checkpoint-{step}`, or None for any other name (staging, superseded, foreign)."""
    match = _CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def accelerate_name(iteration: int) -> str:
    """The name Accelerate's automatic naming gives its `iteration`-th save: ``checkpoint_{iteration}``."""
    return f"checkpoint_{iteration}"


def iteration_from_name(name: str) -> int | None:
    """The save counter in ``checkpoint_{iteration}`` (Accelerate's automatic naming), or None for any other name.

    Only the name Accelerate itself writes counts: no leading zeros, signs or exponents."""
    match = _ACCELERATE_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def library_named(name: str) -> bool:
    """Whether `name` is a checkpoint name another library gives (Lightning's ``*.ckpt``, Accelerate's
    ``checkpoint_{iteration}``), whose step is the one its manifest records, not a number in its name."""
    return lightning_name(name) or iteration_from_name(name) is not None


def lightning_name(name: str) -> bool:
    """Whether `name` is a checkpoint name Lightning gives (``*.ckpt``), never a leftover of ours."""
    return name.endswith(LIGHTNING_SUFFIX) and not name.startswith(".")


def set_aside_kind(name: str) -> tuple[str, str] | None:
    """(the checkpoint's name, "superseded" | "corrupt" | "unfinished") for a directory a save moved aside
    (``checkpoint-N.{kind}-...`` or ``checkpoint_N.{kind}-...``), else None."""
    match = _SET_ASIDE_NAME.match(name)
    return (match.group(1), match.group(2)) if match else None
