"""The names of the on-disk format (version 1), in one place.

Every module that reads or writes a run directory takes its names from here, so a rename of the
format is one edit and a grep for a name finds every user of it::

    runs/exp1/
      .ckptguard.lock  LATEST  events.jsonl
      checkpoint-400/            MANIFEST.json, adapter_model.safetensors, adapter_config.json, state/...
                                 (+ sharded/: DCP's shard files and .metadata, for FSDP2 state)
      .staging-checkpoint-600-<nonce>/      .trash-*      checkpoint-N.superseded-<time>/
      checkpoint-N.corrupt-<time>-<id>/     checkpoint-N.unfinished-<time>-<id>/

    s3://bucket/prefix/run/            (object storage: no rename, so a commit is a create-only marker)
      .ckptguard.lease                 one writer: holder and expiry, renewed, taken over only when stale
      checkpoint-400/...  checkpoint-400/MANIFEST.json  checkpoint-400/COMMITTED   (marker written last)
"""

from __future__ import annotations

import re

MANIFEST_NAME = "MANIFEST.json"
STATE_FILE = "state/trainer_state.json"
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

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_SET_ASIDE_NAME = re.compile(r"^checkpoint-(\d+)\.(superseded|corrupt|unfinished)-")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def step_from_name(name: str) -> int | None:
    """The step in `checkpoint-{step}`, or None for any other name (staging, superseded, foreign)."""
    match = _CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def lightning_name(name: str) -> bool:
    """Whether `name` is a checkpoint name Lightning gives (``*.ckpt``), never a leftover of ours."""
    return name.endswith(LIGHTNING_SUFFIX) and not name.startswith(".")


def set_aside_kind(name: str) -> tuple[int, str] | None:
    """(step, "superseded" | "corrupt" | "unfinished") for a directory a save moved aside, else None."""
    match = _SET_ASIDE_NAME.match(name)
    return (int(match.group(1)), match.group(2)) if match else None
