"""Saving into an opened run: a blocking save, or the same save handed to a background thread.

Async is composition, not a flag through the save: :meth:`Saver.save` snapshots the state, and
either persists it now or copies its tensors into reused host buffers (pinned, on a side stream, on
CUDA) and submits the very same persist to :mod:`ckptguard.run.background`, which finishes it even at
interpreter exit and never in a forked child. A persist is one staged save
(:class:`ckptguard.commit.sequence.StagedSave`) through the run's committer, each phase ending in
agreement between ranks, then what the run does after a commit (retention, the upload).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptguard.catalog.verify import check_written
from ckptguard.commit.base import DeepCheck
from ckptguard.commit.sequence import StagedSave
from ckptguard.dist import Coordinator
from ckptguard.errors import CheckpointError, UnsupportedStateError
from ckptguard.format.layout import checkpoint_name
from ckptguard.format.manifest import MAX_INT
from ckptguard.run.background import BackgroundSaves
from ckptguard.run.run_dir import RunDir
from ckptguard.state import sharded, snapshot
from ckptguard.state.staging import HostBuffers


@dataclass(frozen=True)
class SaveResult:
    """A save that ended committed and verified. `stall_seconds` is what the training loop waited."""

    step: int
    path: Path | str  # the checkpoint's URL in direct-to-remote mode
    bytes: int
    seconds: float
    stall_seconds: float


class Saver:
    """The saves of one opened run: at most one in flight, its error raised at the next save, wait or close."""

    def __init__(self, run: RunDir, coord: Coordinator, *, verify: str, async_save: bool) -> None:
        self.run = run
        self.coord = coord
        self.verify_level = verify
        self.async_save = async_save
        self.results: list[SaveResult] = []
        self.background: BackgroundSaves[SaveResult] = BackgroundSaves()
        self._buffers = HostBuffers()

    def save(
        self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None, *, blocking: bool | None
    ) -> SaveResult | None:
        """See :meth:`ckptguard.CheckpointManager.save`."""
        start = time.perf_counter()
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_INT:
            raise ValueError(f"step must be an int from 0 to 2**63-1, got {step!r}")
        self.wait()
        self.refuse_sharded_direct(state, step)
        blocking = not self.async_save if blocking is None else blocking
        try:
            checked = snapshot.check_metrics(metrics)
            snap = snapshot.take(
                state, step=step, metrics=checked, rank=self.coord.rank, world_size=self.coord.world_size
            )
        except Exception as exc:  # user code (state_dict) can raise anything
            error = exc if isinstance(exc, CheckpointError) else CheckpointError(f"cannot snapshot the state: {exc}")
            error.step = step
            if self.coord.world_size == 1:
                self.run.record_failure("save_failed", error, step=step)
                raise error from (None if error is exc else exc)
            # other ranks are about to wait for this one: fail the save on all of them
            self._persist(step, snapshot.Snapshot(), {}, start, 0.0, error)
            raise  # unreachable in practice: _persist raises the agreed error
        if blocking:
            return self._persist(step, snap, checked, start, None, None)
        event = self._buffers.copy(snap)
        stall = time.perf_counter() - start

        def persist() -> SaveResult:
            if event is not None:
                event.synchronize()  # the device-to-host copies must land before the bytes are read
            return self._persist(step, snap, checked, start, stall, None)

        self.background.submit(persist)
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
        """One staged save, each phase ending in agreement between ranks (a no-op on one process)."""
        run, direct, name = self.run, self.run.direct, checkpoint_name(step)
        save: StagedSave | None = None
        try:
            # 1. rank 0 checks space and opens staging (a directory, or the checkpoint's prefix in the bucket);
            # every rank reports readiness
            inodes = snap.inodes(self.coord.world_size)
            before = None if direct else lambda: run.check_space(step, snap.nbytes, inodes)
            save = StagedSave.begin(self.coord, run.committer, name, step=step, before=before, error=local_error)
            # 2. every rank writes its own files, hashing (and fsyncing) as it goes; with FSDP2 entries, beside
            # its shards (every rank, even one whose files failed, writes those via DCP)
            shards = sharded.Written({})
            if snap.sharded:
                with ThreadPoolExecutor(1, thread_name_prefix="ckptguard-own-files") as pool:
                    own = pool.submit(save.write, snap.files)
                    shards = sharded.save(
                        save.path, snap.sharded, coord=self.coord, step=step, read_back=self.verify_level != "quick"
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
                files, error, sequence=run.next_sequence(), level="quick" if direct else self.verify_level,
                metrics=metrics, deep=deep, reread_all=True, decoded=shards.decoded,
            )  # fmt: skip
        except CheckpointError as exc:
            if save is not None:
                save.discard()
            run.record_failure("save_failed", exc, step=step)
            raise
        # 5. retention and the upload, once every rank knows the save stands
        earlier_upload = run.after_commit(name, published)
        where = str(published.where) if direct else Path(published.where)  # direct: checked against the listing
        result = self._saved(step, where, published.manifest.total_bytes, start, stall, "quick" if direct else None)
        if earlier_upload is not None:  # raised once this save stands locally, its own upload under way
            raise earlier_upload
        return result

    def _saved(
        self, step: int, path: Path | str, nbytes: int, start: float, stall: float | None, verified: str | None
    ) -> SaveResult:
        seconds = time.perf_counter() - start
        result = SaveResult(step, path, nbytes, seconds, seconds if stall is None else stall)
        self.results.append(result)
        self.run.events.emit(
            "save", step=step, path=path, bytes=result.bytes, seconds=seconds, stall_seconds=result.stall_seconds,
            verify=verified or self.verify_level, **self.run.disk_use(),
        )  # fmt: skip
        return result

    def refuse_sharded_direct(self, state: Mapping[str, Any], step: int | None) -> None:
        """Direct-to-bucket mode sends files from memory; FSDP2 shards are written by DCP into a directory.

        Refused at restore (before step 1) and at save, before anything is sent: a checkpoint
        committed without its shards would be skipped as corrupt at every resume.
        """
        if self.run.direct and sharded.any_sharded(state):
            raise UnsupportedStateError(
                "FSDP2 (sharded) state cannot be saved in direct-to-bucket mode: its shards are written by "
                "torch.distributed.checkpoint into a local directory",
                path=str(self.run.tier.store.url),  # type: ignore[union-attr]
                step=step,
                remedy="Use the tiered mode (the default for an s3:// run: save locally, then upload in the "
                "background), which uploads every shard file.",
            )

    def wait(self) -> SaveResult | None:
        """Block until a background save finishes; raise its error (once) if it failed."""
        return self.background.wait()

    def shutdown(self) -> None:
        self.background.shutdown()
