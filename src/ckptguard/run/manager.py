"""CheckpointManager: the public face over an opened run (:class:`ckptguard.run.run_dir.RunDir`), its saves
(:class:`ckptguard.run.save.Saver`) and resume (:func:`ckptguard.run.resume.restore`).

Each piece does one job: the run directory is opened and checked before step 1, a save is one staged
save through the run's committer (blocking, or the same save on a background thread), a restore
checks before it copies. The manager only checks that it is used by the process that made it and
before close(), and hands each call to its piece.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from ckptguard.catalog import discovery, retention
from ckptguard.catalog.checkpoint import Checkpoint
from ckptguard.catalog.discovery import CheckpointInfo
from ckptguard.catalog.verify import check_level
from ckptguard.dist import Coordinator
from ckptguard.errors import CheckpointError
from ckptguard.run import preflight, resume, tiered
from ckptguard.run.run_dir import RunDir
from ckptguard.run.save import Saver, SaveResult
from ckptguard.state.restore import Restored

__all__ = ["CheckpointManager", "SaveResult"]


class CheckpointManager:
    """Saves and restores training state in `run_dir`; see README for the full contract.

    Construction runs the preflight (directory, a real write probe, the lock, free space when
    `expected_bytes` is given, removal of staging leftovers), so an unusable output directory fails
    before the first training step.

    `run_dir` may be an ``s3://bucket/prefix`` URL (or a local directory with ``remote=URL``): each
    checkpoint is then committed locally and uploaded in the background, or in ``storage_options``
    ``mode="direct"`` sent from memory to the bucket; see :mod:`ckptguard.run.tiered` and
    :data:`ckptguard.s3.objectstore.OPTIONS`. `remote_keep_last`: the bucket's retention when tiered.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int = 0,
        metric: str | None = None,
        mode: str = "min",
        keep_every: int | None = None,
        verify: str = "full",
        expected_bytes: int | None = None,
        async_save: bool = False,
        create_parents: bool = False,
        timeout_s: float = 600.0,
        remote: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        remote_keep_last: int | None = None,
    ) -> None:
        self.policy = retention.RetentionPolicy(keep_last, keep_best, metric, mode, keep_every)
        self.verify_level = check_level(verify)
        self.async_save = async_save
        self._coord = Coordinator(timeout_s)
        # a bad URL or option is a ValueError now, before anything is created or locked
        self.run_dir, cache, remote_spec = tiered.resolve(
            run_dir, remote, storage_options, self.policy, remote_keep_last, self._coord.world_size
        )
        preflight.refuse_inside_checkpoint(self.run_dir)  # first: not even a log line goes into a checkpoint
        self._run = RunDir.open(
            self.run_dir, self._coord, policy=self.policy, remote=remote_spec,
            create_parents=create_parents or cache, expected_bytes=expected_bytes,
        )  # fmt: skip
        self._saver = Saver(self._run, self._coord, verify=self.verify_level, async_save=async_save)
        self.results = self._saver.results
        self._closed = False

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        *,
        blocking: bool | None = None,
    ) -> SaveResult | None:
        """Save `state` as ``checkpoint-{step}``; returns the result, or None when saving in the background.

        Ends in a committed, verified checkpoint or a CheckpointError (on every rank). A new save first
        waits for one still in flight and raises that one's error, if any.
        """
        self._check_usable("save()")
        return self._saver.save(step, state, metrics, blocking=blocking)

    def wait(self) -> SaveResult | None:
        """Block until a background save finishes; raise its error (once) if it failed."""
        return self._saver.wait()

    def close(self) -> None:
        """Wait for a background save (raising its error), release the lock. Idempotent.

        In a forked child this only forgets the manager: the save in flight, the thread and the lock
        belong to the parent (releasing the inherited flock would release the parent's lock too).
        """
        if self._closed:
            return
        if self._saver.background.inherited:
            self._closed = True
            return
        try:
            self.wait()
        finally:
            self._closed = True
            try:
                self._run.close()  # waits for the upload in flight, releases the lease and the lock
            finally:
                self._saver.shutdown()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_usable(self, what: str) -> None:
        """Only the process that made a manager, and only before close(), may change the run directory."""
        if self._saver.background.inherited:
            raise CheckpointError(
                f"{what} on a CheckpointManager inherited through fork: it belongs to process "
                f"{self._saver.background.pid}",
                path=self.run_dir,
                remedy="Create a new CheckpointManager in the child for a run directory of its own.",
            )
        if self._closed:
            raise CheckpointError(
                f"{what} on a closed CheckpointManager: it no longer holds the run directory lock",
                path=self.run_dir,
                remedy="Create a new CheckpointManager to save, restore or prune again.",
            )

    # ---- discovery, restore, retention --------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint directory with validity, reason, and why retention keeps it."""
        found = self._run.checkpoints()
        keep = retention.plan(found, self.policy, frozenset(self._run.pruner.protected))
        return [replace(c, keep_reasons=tuple(keep.get(c.name, []))) for c in found]

    def list_remote(self) -> list[Checkpoint]:
        """The checkpoints in the run's bucket (quick-verified; empty for a local run)."""
        return self._run.tier.checkpoints()

    def latest(self) -> CheckpointInfo | None:
        """The most recently saved valid checkpoint (by save sequence), or None."""
        return self._run.latest()

    def restore(
        self,
        state: Mapping[str, Any],
        *,
        step: int | None = None,
        path: str | os.PathLike[str] | None = None,
        check: Callable[[Restored], None] | None = None,
    ) -> Restored | None:
        """Load the newest valid checkpoint (or the one named by `step`/`path`) into `state`'s objects.

        Invalid checkpoints are skipped with a warning; returns None when none exists. A named
        checkpoint that is invalid raises instead. `check` sees what was read (step, plain values,
        metrics) before anything is loaded, and may raise to refuse it (a config that does not
        match, say); the caller's objects change only on success.
        """
        self._check_usable("restore()")
        self.wait()
        self._saver.refuse_sharded_direct(state, step)
        return resume.restore(self._run, self._coord, state, step=step, path=path, check=check)

    def prune(self, *, dry_run: bool = False) -> list[CheckpointInfo]:
        """Delete valid checkpoints retention does not keep; returns them (only lists them if dry_run)."""
        self._check_usable("prune()")
        self.wait()
        found = self._run.checkpoints()
        self._run.pruner.reindex(found)
        return self._run.pruner.prune(found, dry_run=dry_run)

    def prune_superseded(self) -> list[discovery.SetAside]:
        """Delete the directories earlier saves set aside as superseded (corrupt and unfinished ones are kept)."""
        self._check_usable("prune_superseded()")
        return self._run.prune_superseded()
