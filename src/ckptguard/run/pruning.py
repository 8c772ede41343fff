"""Retention carried out, the one way for every place checkpoints live: the policy decides, the committer removes.

:func:`ckptguard.catalog.retention.plan` says what to keep and why; a :class:`Pruner` deletes the
rest through its :class:`ckptguard.commit.base.Committer` (a directory is renamed to trash, a bucket
prefix loses its marker first), so a removal is the commit undone, never a half-deleted checkpoint
that still looks whole. The run directory, its bucket mirror, ``ckptguard prune`` (local or a URL)
and the integrations' rotation all prune through one.

A run keeps an index of its valid checkpoints (filled from discovery at start, kept current by
each commit and removal), because re-reading every manifest after every save would make saves
slower as checkpoints pile up. Only the primary rank deletes; a failed delete after a save is
logged, never turned into a failed save.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from ckptguard.catalog import retention
from ckptguard.commit.base import Committer
from ckptguard.errors import CheckpointError
from ckptguard.files.events import EventLog

log = logging.getLogger("ckptguard")


class Prunable(retention.Checkpoint, Protocol):
    """What a pruner needs of a checkpoint (a directory's CheckpointInfo, a bucket's RemoteCheckpoint)."""

    @property
    def bytes(self) -> int: ...


C = TypeVar("C", bound=Prunable)


class Pruner(Generic[C]):
    """Deletes what `policy` does not keep; never a `protected` name (the checkpoint the run resumed from).

    `remote`: the committer is a bucket's, and the events say so (``remote_prune``, with its URL).
    """

    def __init__(
        self,
        committer: Committer,
        policy: retention.RetentionPolicy,
        events: EventLog | None,
        *,
        primary: bool = True,
        remote: bool = False,
    ) -> None:
        self.committer = committer
        self.policy = policy
        self.protected: set[str] = set()
        self.index: dict[str, C] = {}  # the valid checkpoints by name (primary rank)
        self._events = events
        self._primary = primary
        self._event, self._key = ("remote_prune", "url") if remote else ("prune", "path")

    def reindex(self, found: Sequence[C]) -> None:
        self.index = {c.name: c for c in found if c.valid}

    def prune(self, found: Sequence[C], *, dry_run: bool = False) -> list[C]:
        """Remove the valid checkpoints in `found` the policy does not keep; returns them.

        Raises the first removal's failure (OSError, or a CheckpointError of the bucket), leaving the
        rest in place."""
        doomed = retention.doomed(found, self.policy, frozenset(self.protected))
        if dry_run or not self._primary:
            return doomed
        for c in doomed:
            try:
                self.committer.remove(c.name)
            except FileNotFoundError:  # removed by hand since it was indexed: what retention wanted, say so
                log.warning("%s was already gone when retention removed it", self.committer.where(c.name))
            self.index.pop(c.name, None)
            self._emit(self._event, c.name, step=c.step, bytes=c.bytes)
        return doomed

    def after_commit(self, saved: C) -> None:
        """Retention after a commit, from the index: a failed delete is logged, the save stays good."""
        self.index[saved.name] = saved
        try:
            self.prune(list(self.index.values()))
        except (OSError, CheckpointError) as exc:
            log.warning("could not prune old checkpoints: %s", exc)
            self._emit(f"{self._event}_failed", None, message=str(exc))

    def _emit(self, event: str, name: str | None, **fields: object) -> None:
        if self._events is not None:
            where = {} if name is None else {self._key: self.committer.where(name)}
            self._events.emit(event, **where, **fields)
