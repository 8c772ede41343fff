"""Retention carried out: :func:`ckptguard.catalog.retention.plan` decides, this removes through the publish path.

It keeps an index of the run's valid checkpoints (filled from discovery at start, kept current by
each commit and removal), because re-reading every manifest after every save would make saves
slower as checkpoints pile up. Only the primary rank deletes; a failed delete after a save is logged,
never turned into a failed save.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ckptguard.catalog import discovery, retention
from ckptguard.catalog.discovery import CheckpointInfo, SetAside
from ckptguard.commit import publish
from ckptguard.files.events import EventLog

log = logging.getLogger("ckptguard")


class Pruner:
    """Deletes what the policy does not keep; never the checkpoint the run resumed from (`protected`)."""

    def __init__(self, run_dir: Path, policy: retention.RetentionPolicy, events: EventLog, *, primary: bool) -> None:
        self.run_dir = run_dir
        self.policy = policy
        self.protected: set[str] = set()
        self.index: dict[str, CheckpointInfo] = {}  # valid checkpoints by name (primary rank)
        self._events = events
        self._primary = primary

    def reindex(self, found: list[CheckpointInfo]) -> None:
        self.index = {c.name: c for c in found if c.valid}

    def prune(self, found: list[CheckpointInfo], *, dry_run: bool = False) -> list[CheckpointInfo]:
        """Remove the valid checkpoints in `found` the policy does not keep; returns them."""
        doomed = retention.doomed(found, self.policy, frozenset(self.protected))
        if dry_run or not self._primary:
            return doomed
        for c in doomed:
            publish.remove(c.path)
            self.index.pop(c.name, None)
            self._events.emit("prune", step=c.step, path=c.path, bytes=c.bytes)
        return doomed

    def after_save(self, saved: CheckpointInfo) -> None:
        """Retention after a commit, from the index: a failed delete is logged, the save stays good."""
        self.index[saved.name] = saved
        try:
            self.prune(list(self.index.values()))
        except OSError as exc:
            log.warning("could not prune old checkpoints in %s: %s", self.run_dir, exc)
            self._events.emit("prune_failed", message=str(exc))

    def disk_use(self) -> dict[str, int]:
        """Bytes of the valid checkpoints kept, and the filesystem's free and total bytes (for the report).

        From the index and one statvfs, so it costs no directory walk; empty where the filesystem
        cannot say, or on a rank that keeps no index: a log line never fails a save.
        """
        if not self._primary:
            return {}
        try:
            fs = os.statvfs(self.run_dir)
        except OSError:
            return {}
        return {
            "checkpoint_bytes": sum(c.bytes for c in self.index.values()),
            "free_bytes": fs.f_bavail * fs.f_frsize,
            "total_bytes": fs.f_blocks * fs.f_frsize,
        }

    def prune_superseded(self) -> list[SetAside]:
        """Remove directories earlier saves set aside as superseded (corrupt and unfinished ones are kept)."""
        doomed = [a for a in discovery.set_aside(self.run_dir) if a.kind == "superseded"]
        for a in doomed if self._primary else []:
            publish.remove(a.path)
            self._events.emit("prune", step=a.step, path=a.path, set_aside=a.kind)
        return doomed
