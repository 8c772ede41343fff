"""One commit interface, two kinds of storage: how a save's files become a checkpoint.

A :class:`Committer` opens a :class:`Staging` place for one save (a hidden directory beside the
checkpoints, or the checkpoint's prefix in a bucket), the save's files are written into it, and
:meth:`Committer.publish` makes it a checkpoint in one step that either happens or does not: a
rename on a filesystem (:class:`ckptguard.commit.publish.DirCommitter`), a create-only marker object
in a bucket, which has no rename (:class:`ckptguard.commit.remote_publish.BucketCommitter`). The
sequence around them (create, write, agree between ranks, manifest, publish, discard on failure) is
written once, in :class:`ckptguard.commit.sequence.StagedSave`. docs/protocol.md describes both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ckptguard.files.writer import FilePlan
from ckptguard.format.manifest import FileEntry, Manifest

if TYPE_CHECKING:
    import torch

    from ckptguard.catalog.verify import VerifyReport


@dataclass(frozen=True)
class DeepCheck:
    """What the ``deep`` level compares a published checkpoint with: the live tensors, and the PEFT model."""

    expected: Mapping[str, Mapping[str, torch.Tensor]] | None
    model: Any = None


@dataclass(frozen=True)
class Published:
    """A checkpoint in place under its final name, durable and verified."""

    where: Path | str  # the directory, or the bucket URL of the checkpoint
    manifest: Manifest
    superseded: Path | None = None  # an older directory of the same name, renamed aside
    report: VerifyReport | None = None


class Staging(Protocol):
    """Where one save's files are written before they are a checkpoint."""

    name: str  # the checkpoint's final name
    where: Path | str  # the staging directory, or the bucket prefix being written

    def write(self, plans: Sequence[FilePlan]) -> dict[str, FileEntry]:
        """Write planned files, each hashed as it is written (and fsynced, on a filesystem)."""
        ...


class Committer(Protocol):
    """How a checkpoint becomes committed in one kind of storage."""

    def begin(self, name: str) -> Staging:
        """A fresh staging place for checkpoint `name` (on the primary rank only)."""
        ...

    def publish(
        self,
        staging: Any,
        manifest: Manifest,
        *,
        level: str,
        deep: DeepCheck | None = None,
        reread: frozenset[str] = frozenset(),
        decoded: Mapping[str, Any] | None = None,
        latest: bool = True,
    ) -> Published:
        """Commit `staging` with `manifest`, verify it at `level`; on failure nothing is committed under its name."""
        ...

    def discard(self, staging: Any) -> None:
        """Forget a failed save's staging; never raises (the save's own error matters more)."""
        ...

    def remove(self, name: str) -> None:
        """Delete a committed checkpoint: un-commit it first, then free its bytes."""
        ...

    def where(self, name: str) -> str:
        """Where checkpoint `name` lives, for a message or an event: its directory, or its bucket URL."""
        ...
