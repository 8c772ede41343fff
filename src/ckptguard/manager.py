"""CheckpointManager: preflight, then snapshot -> write -> commit -> verify -> LATEST -> retain per save.

It composes the single-purpose modules and adds the two things none of them can own alone:
agreement between ranks (every phase of a save ends in one collective, so every rank raises the
same error or none does), and the async path (snapshot into reused host buffers, return, persist on
one background thread; its error is logged at once and raised at the next save/wait/close).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ckptguard import commit, discovery, preflight, restore, retention, snapshot, writer
from ckptguard.discovery import CheckpointInfo
from ckptguard.dist import Coordinator
from ckptguard.errors import (
    CheckpointError,
    CorruptCheckpointError,
    VerificationError,
    WriteError,
    from_os_error,
)
from ckptguard.events import EventLog
from ckptguard.manifest import Manifest, checkpoint_name, library_versions
from ckptguard.verify import LEVELS, verify_checkpoint

log = logging.getLogger("ckptguard")


@dataclass(frozen=True)
class SaveResult:
    """A save that ended committed and verified. `stall_seconds` is what the training loop waited."""

    step: int
    path: Path
    bytes: int
    seconds: float
    stall_seconds: float


@dataclass(frozen=True)
class Restored:
    """What restore loaded: the step, from where, the plain values of the state, the saved metrics."""

    step: int
    path: Path
    values: dict[str, Any]
    metrics: dict[str, float]


class CheckpointManager:
    """Saves and restores training state in `run_dir`; see README for the full contract.

    Construction runs the preflight (directory, a real write probe, the lock, free space when
    `expected_bytes` is given, removal of staging leftovers), so an unusable output directory fails
    before the first training step.
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
    ) -> None:
        if verify not in LEVELS:
            raise ValueError(f"verify={verify!r} is not one of {', '.join(LEVELS)}")
        self.policy = retention.RetentionPolicy(keep_last, keep_best, metric, mode, keep_every)
        self.verify_level = verify
        self.async_save = async_save
        self.run_dir = Path(run_dir).absolute()
        self.results: list[SaveResult] = []
        self._create_parents = create_parents
        self._coord = Coordinator(timeout_s)
        self._events = EventLog(self.run_dir, rank=self._coord.rank, enabled=self._coord.is_primary)
        self._lock = preflight.RunLock(self.run_dir)
        self._protected: set[str] = set()
        self._index: dict[str, CheckpointInfo] = {}  # valid checkpoints by name (rank 0)
        self._buffers = snapshot.HostBuffers()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[SaveResult] | None = None
        self._space_known = expected_bytes is not None
        self._sequence = self._coord.on_primary(lambda: self._preflight(expected_bytes))
        self._probe_every_rank()
        self._closed = False
        atexit.register(_close_at_exit, weakref.ref(self))

    # ---- preflight -------------------------------------------------------------------------------

    def _preflight(self, expected_bytes: int | None) -> int:
        start = time.perf_counter()
        try:
            found, removed = preflight.prepare(
                self.run_dir, self._lock, create_parents=self._create_parents,
                expected_bytes=expected_bytes, slots=self.policy.slots,
            )  # fmt: skip
        except CheckpointError as exc:
            self._record_failure("preflight", exc)
            raise
        if removed:
            log.warning("removed %d unfinished save(s) left by a crash in %s: %s", len(removed), self.run_dir, removed)
            self._events.emit("cleanup", removed=removed)
        self._index = {c.name: c for c in found if c.valid}
        self._events.emit(
            "preflight",
            seconds=time.perf_counter() - start,
            checkpoints=len(found),
            policy=asdict(self.policy),
        )
        return max((c.sequence for c in found), default=0)

    def _probe_every_rank(self) -> None:
        """Each rank writes its own files: a node whose mount is read-only must fail now, not at step N."""
        if self._coord.world_size == 1:
            return
        error = None
        if not self._coord.is_primary:
            try:
                preflight.probe_writable(self.run_dir)
            except CheckpointError as exc:
                error = exc
        try:
            self._coord.agree(error, None)
        except CheckpointError as exc:
            self._lock.release()
            self._record_failure("preflight", exc)
            raise

    def _check_space_for_run(self, per_checkpoint: int) -> None:
        existing = sum(c.bytes for c in self._index.values())
        preflight.check_space_for_run(self.run_dir, per_checkpoint, self.policy.slots, existing)

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
        if self._closed:
            raise RuntimeError("save() on a closed CheckpointManager")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
        self.wait()
        blocking = not self.async_save if blocking is None else blocking
        try:
            snap = snapshot.take(
                state, step=step, metrics=metrics, rank=self._coord.rank, world_size=self._coord.world_size
            )
        except Exception as exc:  # user code (state_dict) can raise anything
            if self._coord.world_size == 1:
                raise
            # other ranks are about to wait for this one: fail the save on all of them
            error = CheckpointError(f"cannot snapshot the state: {exc}", step=step)
            self._persist(step, snapshot.Snapshot(), metrics, start, 0.0, error)
            raise  # unreachable in practice: _persist raises the agreed error
        if blocking:
            return self._persist(step, snap, metrics, start, None, None)
        event = self._buffers.copy(snap)
        stall = time.perf_counter() - start
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptguard-save")
        self._pending = self._executor.submit(self._persist_async, step, snap, metrics, start, stall, event)
        return None

    def _persist_async(
        self,
        step: int,
        snap: snapshot.Snapshot,
        metrics: dict[str, float],
        start: float,
        stall: float,
        event: Any,
    ) -> SaveResult:
        if event is not None:
            event.synchronize()  # the device-to-host copies must land before the bytes are read
        return self._persist(step, snap, metrics, start, stall, None)

    def _persist(
        self,
        step: int,
        snap: snapshot.Snapshot,
        metrics: dict[str, float],
        start: float,
        stall: float | None,
        local_error: CheckpointError | None,
    ) -> SaveResult:
        """Phases of one save; each ends in agreement between ranks (a no-op on one process)."""
        staging: Path | None = None
        try:
            # 1. rank 0 checks space and creates the staging directory; every rank reports readiness
            error, name = self._begin(step, snap, local_error)
            staging = self.run_dir / name if name else None  # so a failure below removes it
            staging = self.run_dir / self._coord.agree(error, name, step=step)[0]
            # 2. every rank writes its own files into staging, hashing and fsyncing as it goes
            files, error = {}, None
            try:
                files = writer.write_files(staging, snap.files)
            except OSError as exc:
                error = from_os_error(WriteError, "could not write checkpoint file", exc, step=step)
            except ValueError as exc:
                error = WriteError(f"could not write checkpoint: {exc}", path=staging, step=step)
            every_rank_files = self._coord.agree(error, files, step=step)
            # 3. rank 0 writes the manifest, renames into place, verifies, points LATEST, prunes
            merged = {k: v for rank_files in every_rank_files for k, v in rank_files.items()}
            path = self._coord.on_primary(lambda: self._commit(step, staging, merged, metrics, snap), step=step)
        except CheckpointError as exc:
            if self._coord.is_primary and staging is not None and staging.exists():
                commit.discard_staging(staging)
            self._record_failure("save_failed", exc, step=step)
            raise
        seconds = time.perf_counter() - start
        result = SaveResult(
            step, path, sum(e.size for e in merged.values()), seconds, seconds if stall is None else stall
        )
        self.results.append(result)
        self._events.emit(
            "save",
            step=step,
            path=path,
            bytes=result.bytes,
            seconds=seconds,
            stall_seconds=result.stall_seconds,
            verify=self.verify_level,
            **self._disk_use(),
        )
        return result

    def _disk_use(self) -> dict[str, int]:
        """After a save: bytes of the valid checkpoints kept, and the filesystem's free and total bytes.

        For the run report's disk chart; from the manager's index and one statvfs, so it costs no
        directory walk. Empty when the filesystem cannot say: the log never fails a save.
        """
        if not self._coord.is_primary:  # only rank 0 logs and holds the index
            return {}
        try:
            fs = os.statvfs(self.run_dir)
        except OSError:
            return {}
        return {
            "checkpoint_bytes": sum(c.bytes for c in self._index.values()),
            "free_bytes": fs.f_bavail * fs.f_frsize,
            "total_bytes": fs.f_blocks * fs.f_frsize,
        }

    def _begin(
        self, step: int, snap: snapshot.Snapshot, local_error: CheckpointError | None
    ) -> tuple[CheckpointError | None, str]:
        if local_error is not None or not self._coord.is_primary:
            return local_error, ""
        try:
            if not self._space_known:  # no size hint at construction: the first save measures it
                self._check_space_for_run(snap.nbytes)
                self._space_known = True
            preflight.check_space(
                self.run_dir, snap.nbytes, snap.inodes(self._coord.world_size), what=f"the save of step {step}"
            )
            return None, commit.create_staging(self.run_dir, checkpoint_name(step)).name
        except CheckpointError as exc:
            exc.step = step
            return exc, ""
        except OSError as exc:
            return from_os_error(WriteError, "cannot create the staging directory", exc, step=step), ""

    def _commit(
        self,
        step: int,
        staging: Path,
        files: dict[str, Any],
        metrics: dict[str, float],
        snap: snapshot.Snapshot,
    ) -> Path:
        self._sequence += 1
        manifest = Manifest(
            step=step,
            sequence=self._sequence,
            created=time.time(),
            world_size=self._coord.world_size,
            files=files,
            metrics=metrics,
            versions=library_versions(),
        )
        try:
            path, superseded = commit.commit_checkpoint(staging, self.run_dir, manifest)
        except OSError as exc:
            raise from_os_error(WriteError, "could not commit the checkpoint", exc, step=step) from exc
        if superseded is not None:
            self._events.emit("superseded", step=step, path=path, moved_to=superseded)
        deep = self.verify_level == "deep"
        report = verify_checkpoint(
            path,
            self.verify_level,
            expected=snap.tensor_files() if deep else None,
            model=snap.peft_model if deep else None,
        )
        self._events.emit(
            "verify",
            step=step,
            path=path,
            level=self.verify_level,
            ok=report.ok,
            bytes=report.bytes_read,
            seconds=report.seconds,
            problems=[str(p) for p in report.problems],
        )
        if not report.ok:
            moved = commit.quarantine(path, "corrupt")
            raise VerificationError(
                f"checkpoint failed {self.verify_level} verification right after writing ({report.reason}); "
                f"moved aside to {moved.name}",
                path=path,
                step=step,
            )
        try:
            commit.write_latest(self.run_dir, path.name)
        except OSError as exc:
            # a save reported as failed must not be resumed from: move the new checkpoint aside
            moved = commit.quarantine(path, "unfinished")
            raise from_os_error(
                WriteError,
                f"could not update LATEST; the new checkpoint was moved aside to {moved.name}",
                exc,
                path=self.run_dir,
                step=step,
            ) from exc
        self._index[path.name] = CheckpointInfo(
            name=path.name, path=path, step=step, valid=True, bytes=manifest.total_bytes,
            sequence=manifest.sequence, created=manifest.created, metrics=dict(metrics),
        )  # fmt: skip
        self._prune_quietly()
        return path

    # ---- waiting, errors, closing ------------------------------------------------------------------

    def wait(self) -> SaveResult | None:
        """Block until a background save finishes; raise its error (once) if it failed."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        """Wait for a background save (raising its error), release the lock. Idempotent."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._events.emit("close")  # a run whose log lacks this ended without closing: killed or crashed
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._lock.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _record_failure(self, event: str, exc: CheckpointError, *, step: int | None = None) -> None:
        log.error("%s: %s", type(exc).__name__, exc, exc_info=exc)
        self._events.emit(
            event,
            step=step,
            error=type(exc).__name__,
            message=str(exc),
            errno=exc.errno,
            failed_rank=exc.rank,
        )

    # ---- discovery, restore, retention --------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint directory with validity, reason, and why retention keeps it."""
        found = discovery.discover(self.run_dir)
        keep = retention.plan(_candidates(found), self.policy, frozenset(self._protected))
        return [_with_reasons(c, keep.get(c.name, [])) for c in found]

    def latest(self) -> CheckpointInfo | None:
        """The most recently saved valid checkpoint (by save sequence), or None."""
        valid = discovery.newest_first(discovery.discover(self.run_dir))
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
        self.wait()
        explicit = step is not None or path is not None
        names = self._coord.on_primary(lambda: discovery.restore_candidates(self.run_dir, step, path))
        for candidate in names:
            loaded, result, error = None, None, None
            try:
                loaded = restore.open_checkpoint(Path(candidate), state, rank=self._coord.rank)
                result = Restored(loaded.step, loaded.path, restore.plain_values(loaded, state), loaded.metrics)
                if check is not None:  # may refuse (raise) before any large file is read
                    check(result)
                restore.read_objects(loaded, state, rank=self._coord.rank)
            except CheckpointError as exc:
                error = exc
            try:
                self._coord.agree(error, None)
            except CheckpointError as exc:
                if explicit or not isinstance(exc, CorruptCheckpointError):
                    self._record_failure("resume_failed", exc)
                    raise
                log.warning("skipping %s: %s", candidate, exc)
                self._events.emit("resume_skip", path=candidate, reason=str(exc))
                continue
            assert loaded is not None and result is not None
            restore.apply(loaded, state)
            self._protected.add(loaded.path.name)
            self._events.emit("resume", step=loaded.step, path=loaded.path)
            return result
        return None  # (a named checkpoint that fails raised above)

    def prune(self, *, dry_run: bool = False) -> list[CheckpointInfo]:
        """Delete valid checkpoints retention does not keep; returns them (only lists them if dry_run)."""
        self.wait()
        found = discovery.discover(self.run_dir)
        self._index = {c.name: c for c in found if c.valid}
        return self._prune_now(found, dry_run=dry_run)

    def _prune_now(self, found: list[CheckpointInfo], *, dry_run: bool = False) -> list[CheckpointInfo]:
        keep = retention.plan(_candidates(found), self.policy, frozenset(self._protected))
        doomed = [c for c in found if c.valid and not keep.get(c.name)]
        if dry_run or not self._coord.is_primary:
            return doomed
        for c in doomed:
            commit.remove(c.path)
            self._index.pop(c.name, None)
            self._events.emit("prune", step=c.step, path=c.path, bytes=c.bytes)
        return doomed

    def _prune_quietly(self) -> None:
        """Retention after a save: a failed delete is logged, never turned into a failed save.

        Works from the manager's index of valid checkpoints (filled by the constructor's discovery,
        kept current by commits and prunes): re-reading every manifest per save would make each
        save slower as checkpoints pile up.
        """
        try:
            self._prune_now(list(self._index.values()))
        except OSError as exc:
            log.warning("could not prune old checkpoints in %s: %s", self.run_dir, exc)
            self._events.emit("prune_failed", message=str(exc))


def _candidates(found: list[CheckpointInfo]) -> list[retention.Candidate]:
    return [retention.Candidate(c.name, c.step, c.sequence, c.metrics) for c in found if c.valid]


def _with_reasons(info: CheckpointInfo, reasons: list[str]) -> CheckpointInfo:
    return replace(info, keep_reasons=tuple(reasons))


def _close_at_exit(ref: weakref.ref[CheckpointManager]) -> None:
    """At interpreter exit, a background save still finishes and its error is logged, never lost."""
    mgr = ref()
    if mgr is None or mgr._closed:
        return
    try:
        mgr.close()
    except CheckpointError as exc:
        log.error("a background save failed and was never waited for: %s", exc)
