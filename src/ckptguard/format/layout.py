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
PARTIAL_PREFIX = ".partial-"  # a checkpoint file being written (.partial-last.ckpt-<nonce>: never ends in .ckpt)
TRASH_PREFIX = ".trash-"
SUPERSEDED_MARK = ".superseded-"
QUARANTINE_KINDS = ("corrupt", "unfinished")  # checkpoint-N.{kind}-<time>-<id>: a failed save, kept

# A Lightning ModelCheckpoint names its checkpoints (epoch=0-step=100.ckpt, last.ckpt); with
# VerifiedCheckpointIO each is one file, Lightning's torch.save archive with the manifest as one more record
# (format/ckpt_file.py), whose step is in that manifest, not its name.
LIGHTNING_SUFFIX = ".ckpt"
MANIFEST_RECORD = f"ckptguard/{MANIFEST_NAME}"  # in a checkpoint file: the manifest, inside the archive's folder
# Beside a ModelCheckpoint dirpath, not in it: the run's lock, its owner and events.jsonl, so a listing of the
# dirpath meets only Lightning's own .ckpt files (runs/pl -> runs/.pl.ckptguard/)
SIDE_DIR_MARK = ".ckptguard"
ACCELERATE_ITERATION_FILE = "ckptguard_accelerate.json"  # {"iteration": N}: Accelerate's save counter at the save
STATE_FORMAT_VERSION = 1  # trainer_state.json's "format_version"

# Exactly what checkpoint_name and accelerate_name write: ASCII digits without leading zeros, nothing after (`$`
# allows a "\n", `\d` Unicode digits), so a copy named checkpoint-007 is not a second step 7 to list, order or
# prune, and checkpoint_007, checkpoint_-1 and checkpoint_1e3 are nobody's checkpoint
_NUMBER = "(0|[1-9][0-9]*)"
_CHECKPOINT_NAME = re.compile(rf"^checkpoint-{_NUMBER}\Z")
_ACCELERATE_NAME = re.compile(rf"checkpoint_{_NUMBER}")  # used with fullmatch
_SET_ASIDE_NAME = re.compile(r"^(checkpoint[-_](?:0|[1-9][0-9]*))\.(superseded|corrupt|unfinished)-")


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


def side_dir_name(dirname: str) -> str:
    """The name, beside a checkpoint directory `dirname`, of the directory holding its run files."""
    return f".{dirname}{SIDE_DIR_MARK}"


def set_aside_kind(name: str) -> tuple[str, str] | None:
    """(the checkpoint's name, "superseded" | "corrupt" | "unfinished") for a directory a save moved aside
    (``checkpoint-N.{kind}-...`` or ``checkpoint_N.{kind}-...``), else None."""
    match = _SET_ASIDE_NAME.match(name)
    return (match.group(1), match.group(2)) if match else None
