"""CheckpointManager: preflight, then snapshot -> write -> commit -> verify -> LATEST -> retain per save.

It composes the single-purpose modules and adds what none of them can own alone: agreement between
ranks (every phase of a save ends in one collective, so every rank raises the same error or none
does), and the async path (snapshot into reused host buffers, return, persist in the background via
:mod:`ckptguard.run.background`; its error is logged at once and raised at the next save/wait/close).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ckptguard.catalog import discovery, retention
from ckptguard.catalog.checkpoint import Checkpoint, newest_first
from ckptguard.catalog.discovery import CheckpointInfo
from ckptguard.catalog.verify import check_level, check_written
from ckptguard.commit import publish
from ckptguard.commit.base import Committer, DeepCheck
from ckptguard.commit.publish import DirCommitter
from ckptguard.commit.sequence import StagedSave
from ckptguard.dist import Coordinator
from ckptguard.errors import CheckpointError, UnsupportedStateError
from ckptguard.files.events import EventLog, record_failure
from ckptguard.format.layout import checkpoint_name
from ckptguard.format.manifest import MAX_INT
from ckptguard.run import preflight, tiered
from ckptguard.run.background import BackgroundSaves
from ckptguard.run.pruning import Pruner
from ckptguard.s3.objectstore import is_remote
from ckptguard.state import sharded, snapshot
from ckptguard.state.restore import Restored, restore_into


@dataclass(frozen=True)
class SaveResult:
    """A save that ended committed and verified. `stall_seconds` is what the training loop waited."""

    step: int
    path: Path | str  # the checkpoint's URL in direct-to-remote mode
    bytes: int
    seconds: float
    stall_seconds: float


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
        self.run_dir, cache, self._remote_spec = tiered.resolve(
            run_dir, remote, storage_options, self.policy, remote_keep_last, self._coord.world_size
        )
        preflight.refuse_inside_checkpoint(self.run_dir)  # first: not even a log line goes into a checkpoint
        self.results: list[SaveResult] = []
        self._create_parents = create_parents or cache
        direct = self._remote_spec is not None and self._remote_spec.direct
        self._events = EventLog(self.run_dir, rank=self._coord.rank, enabled=self._coord.is_primary)
        self._lock = preflight.RunLock(self.run_dir)
        self._pruner = Pruner(self.run_dir, self.policy, self._events, primary=self._coord.is_primary)
        self._buffers = snapshot.HostBuffers()
        self._background: BackgroundSaves[SaveResult] = BackgroundSaves()
        self._space_known = expected_bytes is not None
        self._tier: tiered.LocalOnly | tiered.RemoteMirror = tiered.LocalOnly(self.run_dir)
        self._sequence = self._coord.on_primary(lambda: self._preflight(None if direct else expected_bytes))
        # how a save becomes a checkpoint here: a directory renamed into place, or a marker in the bucket
        self._committer: Committer = (
            self._tier.committer() if isinstance(self._tier, tiered.RemoteMirror) and direct
            else DirCommitter(self.run_dir, self._events)
        )  # fmt: skip
        try:  # each rank writes its own files: a node whose mount is read-only must fail now, not at step N
            preflight.probe_every_rank(self.run_dir, self._coord)
        except CheckpointError as exc:
            self._lock.release()
            self._tier.close()
            self._record_failure("preflight", exc)
            raise
        self._closed = False

    # ---- preflight -------------------------------------------------------------------------------

    def _preflight(self, expected_bytes: int | None) -> int:
        """Rank 0's preflight; returns the highest save sequence found, so new saves come after it."""
        try:
            found = preflight.prepare(
                self.run_dir, self._lock, create_parents=self._create_parents, expected_bytes=expected_bytes,
                policy=self.policy, events=self._events,
            )  # fmt: skip
            # endpoint, bucket, credentials and the lease: before step 1 too
            self._tier = tiered.open_tier(self._remote_spec, self.run_dir, self._events)
        except CheckpointError as exc:
            self._lock.release()
            self._record_failure("preflight", exc)
            raise
        self._pruner.reindex(found)
        return max(self._tier.max_sequence, *(c.sequence for c in found), 0)

    # ---- save ------------------------------------------------------------------------------------

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
        start = time.perf_counter()
        self._check_usable("save()")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_INT:
            raise ValueError(f"step must be an int from 0 to 2**63-1, got {step!r}")
        self.wait()
        self._refuse_sharded_direct(state, step)
        blocking = not self.async_save if blocking is None else blocking
        try:
            metrics = snapshot.check_metrics(metrics)
            snap = snapshot.take(
                state, step=step, metrics=metrics, rank=self._coord.rank, world_size=self._coord.world_size
            )
        except Exception as exc:  # user code (state_dict) can raise anything
            error = exc if isinstance(exc, CheckpointError) else CheckpointError(f"cannot snapshot the state: {exc}")
            error.step = step
            if self._coord.world_size == 1:
                self._record_failure("save_failed", error, step=step)
                raise error from (None if error is exc else exc)
            # other ranks are about to wait for this one: fail the save on all of them
            self._persist(step, snapshot.Snapshot(), {}, start, 0.0, error)
            raise  # unreachable in practice: _persist raises the agreed error
        if blocking:
            return self._persist(step, snap, metrics, start, None, None)
        event = self._buffers.copy(snap)
        stall = time.perf_counter() - start

        def persist() -> SaveResult:
            if event is not None:
                event.synchronize()  # the device-to-host copies must land before the bytes are read
            return self._persist(step, snap, metrics, start, stall, None)

        self._background.submit(persist)
        return None

    def _persist(
        self,
        step: int,
        snap: snapshot.Snapshot,
        metrics: dict[str, float],
        start: float,
        stall: float | None,
        local_error: CheckpointError | None,
    ) -> SaveResult:
        """The phases of one staged save (:class:`ckptguard.commit.sequence.StagedSave`), each ending in agreement."""
        direct = self._tier.direct  # from memory to the bucket, committed there; nothing is written locally
        save: StagedSave | None = None
        try:
            # 1. rank 0 checks space and opens staging (a directory, or the checkpoint's prefix in the bucket);
            # every rank reports readiness
            before = None if direct else lambda: self._check_space(step, snap)
            save = StagedSave.begin(
                self._coord, self._committer, checkpoint_name(step), step=step, before=before, error=local_error
            )
            # 2. every rank writes its own files, hashing (and fsyncing) as it goes; with FSDP2 entries, beside
            # its shards (every rank, even one whose files failed, writes those via DCP)
            shards = sharded.Written({})
            if snap.sharded:
                with ThreadPoolExecutor(1, thread_name_prefix="ckptguard-own-files") as pool:
                    own = pool.submit(save.write, snap.files)
                    shards = sharded.save(
                        save.path, snap.sharded, coord=self._coord, step=step, read_back=self.verify_level != "quick"
                    )
                    files, error = own.result()
                files = {**files, **shards.entries}
            else:
                files, error = save.write(snap.files)
            # 3. every rank re-reads what it wrote (its shards: read back while fsynced), in parallel with the
            # others, before they agree; a bucket's objects were hashed as they were sent
            if not direct:
                error = error or check_written(
                    save.path, files, level=self.verify_level, step=step, observed=shards.observed,
                    refused=shards.refused,
                )  # fmt: skip
            # 4. rank 0 writes the manifest, commits, verifies what is left, points LATEST
            deep = DeepCheck(snap.tensor_files(), snap.peft_model) if self.verify_level == "deep" else None
            published = save.finish(
                files, error, sequence=self._next_sequence(), level="quick" if direct else self.verify_level,
                metrics=metrics, deep=deep, reread_all=True, decoded=shards.decoded,
            )  # fmt: skip
        except CheckpointError as exc:
            if save is not None:
                save.discard()
            self._record_failure("save_failed", exc, step=step)
            raise
        nbytes = published.manifest.total_bytes
        if direct:  # hashed as sent, then checked against the bucket's listing
            self._tier.committed(checkpoint_name(step), published.manifest)
            return self._saved(step, str(published.where), nbytes, start, stall, verified="quick")
        path = Path(published.where)
        if self._coord.is_primary:  # 5. prunes once every rank knows the save stands (its removal is work the
            # other ranks must not wait behind)
            facts = CheckpointInfo.facts(published.manifest)
            self._pruner.after_save(CheckpointInfo(name=path.name, path=path, step=step, valid=True, **facts))
        earlier_upload = self._tier.submit(path)
        result = self._saved(step, path, nbytes, start, stall)
        if earlier_upload is not None:  # raised once this save stands locally, its own upload under way
            raise earlier_upload
        return result

    def _next_sequence(self) -> int:
        """The next save's place in the run's order: after every save before it, here or in the bucket."""
        self._sequence += 1
        return self._sequence

    def _check_space(self, step: int, snap: snapshot.Snapshot) -> None:
        """Rank 0, before staging: room for this save (with no size hint at construction, for the whole window)."""
        window = None if self._space_known else (self.policy.slots, sum(c.bytes for c in self._pruner.index.values()))
        preflight.check_space_for_save(
            self.run_dir, snap.nbytes, snap.inodes(self._coord.world_size), step=step, run_window=window
        )
        self._space_known = True

    def _saved(
        self, step: int, path: Path | str, nbytes: int, start: float, stall: float | None, verified: str | None = None
    ) -> SaveResult:
        seconds = time.perf_counter() - start
        result = SaveResult(step, path, nbytes, seconds, seconds if stall is None else stall)
        self.results.append(result)
        self._events.emit(
            "save", step=step, path=path, bytes=result.bytes, seconds=seconds,
            stall_seconds=result.stall_seconds, verify=verified or self.verify_level, **self._pruner.disk_use(),
        )  # fmt: skip
        return result

    # ---- waiting, errors, closing ------------------------------------------------------------------

    def wait(self) -> SaveResult | None:
        """Block until a background save finishes; raise its error (once) if it failed."""
        return self._background.wait()

    def close(self) -> None:
        """Wait for a background save (raising its error), release the lock. Idempotent.

        In a forked child this only forgets the manager: the save in flight, the thread and the lock
        belong to the parent (releasing the inherited flock would release the parent's lock too).
        """
        if self._closed:
            return
        if self._background.inherited:
            self._closed = True
            return
        try:
            self.wait()
        finally:
            self._closed = True
            try:
                self._tier.close()  # waits for the upload in flight, releases the lease, raises a failure
            finally:
                self._events.emit("close")  # a run whose log lacks this ended without closing: killed or crashed
                self._background.shutdown()
                publish.wait_for_removals()
                self._lock.release()

    def _refuse_sharded_direct(self, state: Mapping[str, Any], step: int | None) -> None:
        """Direct-to-bucket mode sends files from memory; FSDP2 shards are written by DCP into a directory.

        Refused at restore (before step 1) and at save, before anything is sent: a checkpoint
        committed without its shards would be skipped as corrupt at every resume.
        """
        if self._tier.direct and sharded.any_sharded(state):
            raise UnsupportedStateError(
                "FSDP2 (sharded) state cannot be saved in direct-to-bucket mode: its shards are written by "
                "torch.distributed.checkpoint into a local directory",
                path=str(self._tier.store.url),
                step=step,
                remedy="Use the tiered mode (the default for an s3:// run: save locally, then upload in the "
                "background), which uploads every shard file.",
            )

    def _check_usable(self, what: str) -> None:
        """Only the process that made a manager, and only before close(), may change the run directory."""
        if self._background.inherited:
            raise CheckpointError(
                f"{what} on a CheckpointManager inherited through fork: it belongs to process {self._background.pid}",
                path=self.run_dir,
                remedy="Create a new CheckpointManager in the child for a run directory of its own.",
            )
        if self._closed:
            raise CheckpointError(
                f"{what} on a closed CheckpointManager: it no longer holds the run directory lock",
                path=self.run_dir,
                remedy="Create a new CheckpointManager to save, restore or prune again.",
            )

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _record_failure(self, event: str, exc: CheckpointError, *, step: int | None = None) -> None:
        record_failure(self._events, event, exc, step=step)

    # ---- discovery, restore, retention --------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint directory with validity, reason, and why retention keeps it."""
        found = discovery.discover(self.run_dir)
        keep = retention.plan(found, self.policy, frozenset(self._pruner.protected))
        return [replace(c, keep_reasons=tuple(keep.get(c.name, []))) for c in found]

    def list_remote(self) -> list[Checkpoint]:
        """The checkpoints in the run's bucket (quick-verified; empty for a local run)."""
        return self._tier.checkpoints()

    def latest(self) -> CheckpointInfo | None:
        """The most recently saved valid checkpoint (by save sequence), or None."""
        valid = newest_first(discovery.discover(self.run_dir))
        return valid[0] if valid else None

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
        self._refuse_sharded_direct(state, step)
        names = self._coord.on_primary(lambda: self._tier.resume_candidates(step, path))
        try:
            result = restore_into(
                state, names, coord=self._coord, events=self._events,
                explicit=step is not None or path is not None, check=check, fetch=self._tier.fetch,
            )  # fmt: skip
        except CheckpointError as exc:
            self._record_failure("resume_failed", exc)
            raise
        finally:
            if any(is_remote(name) for name in names):  # checkpoints may have been fetched into the local tier
                self._pruner.reindex(discovery.discover(self.run_dir))
        if result is not None:
            self._pruner.protected.add(result.path.name)
        return result

    def prune(self, *, dry_run: bool = False) -> list[CheckpointInfo]:
        """Delete valid checkpoints retention does not keep; returns them (only lists them if dry_run)."""
        self._check_usable("prune()")
        self.wait()
        found = discovery.discover(self.run_dir)
        self._pruner.reindex(found)
        return self._pruner.prune(found, dry_run=dry_run)

    def prune_superseded(self) -> list[discovery.SetAside]:
        """Delete the directories earlier saves set aside as superseded (corrupt and unfinished ones are kept)."""
        self._check_usable("prune_superseded()")
        return self._pruner.prune_superseded()
