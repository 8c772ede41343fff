"""The opened run: its lock, preflight and probe on every rank, events log, index, save sequence, tier, committer.

A run directory is opened once, before step 1 (an unusable one fails there, not at the first save),
by :meth:`RunDir.open`: rank 0 takes the run lock and runs the preflight (the directory, a real write
probe, free space, leftovers of killed saves removed under the lock) and opens the remote tier
(endpoint, bucket, credentials, the lease); every other rank probes too. What a save needs of the
run afterwards is here and nowhere else: the next save sequence (:meth:`RunDir.next_sequence`, after
every save before it, local or in the bucket), the space check, how a save becomes a checkpoint
(:attr:`RunDir.committer`), and what follows a commit (:meth:`RunDir.after_commit`: retention, the
upload). The integrations open their run directories through the same :meth:`RunDir.open`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptguard.catalog import retention
from ckptguard.catalog.checkpoint import newest_first, next_sequence
from ckptguard.catalog.discovery import CheckpointInfo, SetAside, discover, set_aside
from ckptguard.commit import publish
from ckptguard.commit.base import Committer, Published
from ckptguard.commit.publish import DirCommitter
from ckptguard.dist import Coordinator
from ckptguard.errors import CheckpointError
from ckptguard.files.events import EventLog, record_failure
from ckptguard.format.layout import side_dir_name
from ckptguard.run import preflight, tiered
from ckptguard.run.pruning import Pruner


class RunDir:
    """One run directory, opened (locked and checked) by this process; :meth:`close` hands it back."""

    def __init__(
        self, path: Path, coord: Coordinator, policy: retention.RetentionPolicy, own_files: Path | None = None
    ) -> None:
        self.path = path
        self.coord = coord
        self.policy = policy
        own = own_files or path  # where the lock, its owner and events.jsonl go (a directory of their own, or path)
        self.events = EventLog(own, rank=coord.rank, enabled=coord.is_primary)
        # a CheckpointManager and a Lightning fit on one directory lock in two places: each checks the other's
        self.lock = preflight.RunLock(own, path if own_files else path.parent / side_dir_name(path.name))
        self.pruner: Pruner[CheckpointInfo] = Pruner(
            DirCommitter(path, self.events), policy, self.events, primary=coord.is_primary
        )
        self.tier: tiered.LocalOnly | tiered.RemoteMirror = tiered.LocalOnly(path)
        self.committer: Committer = DirCommitter(path, self.events)
        self._next = 1  # the next save's sequence: set at open, after every save found
        self._space_known = False

    @classmethod
    def open(
        cls,
        path: Path,
        coord: Coordinator,
        *,
        policy: retention.RetentionPolicy,
        remote: tiered.RemoteSpec | None = None,
        create_parents: bool = False,
        expected_bytes: int | None = None,
        own_files: Path | None = None,
    ) -> RunDir:
        """Lock and check `path` on every rank (call it on every rank); the typed error of whatever fails.

        `own_files`: a directory (created at the lock) for the run's lock, owner and events, for a directory
        whose listing must show only its checkpoints (a Lightning ModelCheckpoint dirpath)."""
        run = cls(path, coord, policy, own_files)
        direct = remote is not None and remote.direct
        run._space_known = expected_bytes is not None
        run._next = coord.on_primary(lambda: run._prepare(remote, create_parents, None if direct else expected_bytes))
        if isinstance(run.tier, tiered.RemoteMirror) and direct:  # a save commits by a marker in the bucket
            run.committer = run.tier.committer()
        try:  # each rank writes its own files: a node whose mount is read-only must fail now, not at step N
            preflight.probe_every_rank(path, coord)
        except CheckpointError as exc:
            run.lock.release()
            run.tier.close()
            run.record_failure("preflight", exc)
            raise
        return run

    def _prepare(self, remote: tiered.RemoteSpec | None, create_parents: bool, expected_bytes: int | None) -> int:
        """Rank 0's preflight and tier; returns the sequence that puts a new save after every one found."""
        try:
            found = preflight.prepare(
                self.path, self.lock, create_parents=create_parents, expected_bytes=expected_bytes,
                policy=self.policy, events=self.events,
            )  # fmt: skip
            # endpoint, bucket, credentials and the lease: before step 1 too
            self.tier = tiered.open_tier(remote, self.path, self.events)
        except CheckpointError as exc:
            self.lock.release()
            self.record_failure("preflight", exc)
            raise
        self.pruner.reindex(found)
        return next_sequence([*found, *self.tier.saved()])

    @property
    def direct(self) -> bool:
        """Saves go from memory to the bucket; nothing is written to this directory at save."""
        return self.tier.direct

    def next_sequence(self) -> int:
        """The next save's place in the run's order: after every save before it, here or in the bucket.

        The only source of save sequences in a run (this process holds its lock, so none is handed out twice)."""
        sequence, self._next = self._next, self._next + 1
        return sequence

    def check_space(self, step: int, nbytes: int, inodes: int) -> None:
        """Rank 0, before staging: room for this save (with no size hint at open, for the whole retention window)."""
        window = None if self._space_known else (self.policy.slots, sum(c.bytes for c in self.pruner.index.values()))
        preflight.check_space_for_save(self.path, nbytes, inodes, step=step, run_window=window)
        self._space_known = True

    def after_commit(self, name: str, published: Published) -> CheckpointError | None:
        """What follows the commit of checkpoint `name`: retention (rank 0), then its upload (direct: the index).

        Returns the failure of an earlier upload not yet reported, for the caller to raise now that this
        save stands.
        """
        if self.direct:
            self.tier.committed(name, published.manifest)
            return None
        path = Path(published.where)
        if self.coord.is_primary:  # once every rank knows the save stands: its removals are work the other
            # ranks must not wait behind
            facts = CheckpointInfo.facts(published.manifest)
            step = published.manifest.step if published.manifest.step is not None else -1
            self.pruner.after_commit(CheckpointInfo(name=name, path=path, step=step, valid=True, **facts))
        return self.tier.submit(path)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint directory of the run, quick-verified, in step order."""
        return discover(self.path)

    def latest(self) -> CheckpointInfo | None:
        """The most recently saved valid checkpoint (by save sequence), or None."""
        valid = newest_first(self.checkpoints())
        return valid[0] if valid else None

    def disk_use(self) -> dict[str, int]:
        """Bytes of the valid checkpoints kept, and the filesystem's free and total bytes (for the save's event).

        From the index and one statvfs, so it costs no directory walk; empty where the filesystem
        cannot say, or on a rank that keeps no index: a log line never fails a save.
        """
        if not self.coord.is_primary:
            return {}
        try:
            fs = os.statvfs(self.path)
        except OSError:
            return {}
        return {
            "checkpoint_bytes": sum(c.bytes for c in self.pruner.index.values()),
            "free_bytes": fs.f_bavail * fs.f_frsize,
            "total_bytes": fs.f_blocks * fs.f_frsize,
        }

    def prune_superseded(self) -> list[SetAside]:
        """Remove directories earlier saves set aside as superseded (corrupt and unfinished ones are kept)."""
        doomed = [a for a in set_aside(self.path) if a.kind == "superseded"]
        for a in doomed if self.coord.is_primary else []:
            publish.remove(a.path)
            self.events.emit("prune", step=a.step, path=a.path, set_aside=a.kind)
        return doomed

    def record_failure(self, event: str, exc: CheckpointError, *, step: int | None = None) -> None:
        record_failure(self.events, event, exc, step=step)

    def close(self) -> None:
        """Wait for the upload in flight (raising its failure), release the lease, the removals, the lock."""
        try:
            self.tier.close()
        finally:
            self.events.emit("close")  # a run whose log lacks this ended without closing: killed or crashed
            publish.wait_for_removals()
            self.lock.release()
