"""One save from staging to commit, on every rank: the only code that runs this sequence.

    1. :meth:`StagedSave.begin`: the primary rank runs `before` (the space check), then its committer
       opens a staging place; every rank gets its location, or every rank raises the same error
       (also when one rank arrives with an error of its own, from its snapshot)
    2. every rank writes its files into it (:meth:`StagedSave.write`), or a library writes them and
       the primary adopts what it finds there at the commit (a close watch hashing each file as the
       library closes it)
    3. :meth:`StagedSave.finish`: the ranks agree (each rank's error, or its files); the primary makes
       the one manifest (:meth:`ckptguard.format.manifest.Manifest.new`) and publishes through its
       committer, which verifies; every rank returns what was published
    on any failure the staging place is discarded and every rank raises the same typed error;
    nothing earlier is touched.

The manager, the HF / Accelerate / Lightning integrations, ``save_lora_adapters`` and ``ckptguard
export`` all save through this class; what differs between them is only what they write and which
committer (a directory or a bucket) they hand it. docs/protocol.md describes the steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ckptguard.commit.base import Committer, DeepCheck, Published
from ckptguard.dist import Coordinator
from ckptguard.errors import CheckpointError, WriteError, from_os_error
from ckptguard.files import writer
from ckptguard.files.closewatch import CloseWatch
from ckptguard.files.writer import FilePlan
from ckptguard.format.manifest import FileEntry, Manifest


class StagedSave:
    """A save under way: where every rank writes, and (on the primary) the staging its committer opened."""

    def __init__(self, coord: Coordinator, committer: Committer, name: str, where: str, step: int | None) -> None:
        self.coord = coord
        self.committer = committer
        self.name = name  # the checkpoint's final name
        self.where = where  # the staging directory (or bucket prefix), the same on every rank
        self.step = step
        self._staging: Any = None
        self.watch: CloseWatch | None = None  # the primary's watch on what a library closes, when asked for

    @classmethod
    def begin(
        cls,
        coord: Coordinator,
        committer: Committer,
        name: str,
        *,
        step: int | None,
        before: Callable[[], None] | None = None,
        error: CheckpointError | None = None,
        watch: bool = False,
    ) -> StagedSave:
        """Step 1 on every rank. `error`: this rank already failed (its snapshot); `watch`: a library writes."""
        staging: Any = None
        if coord.is_primary and error is None:
            try:
                if before is not None:
                    before()
                staging = committer.begin(name)
            except CheckpointError as exc:
                error = exc
            except OSError as exc:
                error = from_os_error(WriteError, "cannot create the staging directory", exc, step=step)
            except Exception as exc:  # anything else must reach the other ranks too, not leave them waiting
                error = WriteError(f"cannot open the staging place: {type(exc).__name__}: {exc}", step=step)
        if error is not None and error.step is None:
            error.step = step
        where = str(staging.where) if staging is not None else ""
        try:
            where = coord.agree(error, where, step=step)[0]
        except CheckpointError:
            if staging is not None:
                committer.discard(staging)
            raise
        save = cls(coord, committer, name, where, step)
        save._staging = staging
        if watch and staging is not None:
            save.watch = CloseWatch(Path(where))
        return save

    @classmethod
    def alone(cls, committer: Committer, name: str, *, step: int | None = None, watch: bool = False) -> StagedSave:
        """A save one process makes by itself (an adapter, an export, Lightning's CheckpointIO on rank 0)."""
        return cls.begin(Coordinator.alone(), committer, name, step=step, watch=watch)

    @property
    def path(self) -> Path:
        """The staging directory, for what a rank or a library writes into it."""
        return Path(self.where)

    def write(self, plans: Sequence[FilePlan]) -> tuple[dict[str, FileEntry], CheckpointError | None]:
        """This rank's planned files written (hashed, fsynced), or the error that stopped them (agreed on later)."""
        try:
            if self._staging is not None:
                return self._staging.write(plans), None
            return writer.write_files(self.path, list(plans)), None
        except CheckpointError as exc:
            return {}, exc
        except OSError as exc:
            return {}, from_os_error(WriteError, "could not write checkpoint file", exc, step=self.step)
        except ValueError as exc:
            return {}, WriteError(f"could not write checkpoint: {exc}", path=self.where, step=self.step)

    def finish(
        self,
        files: Mapping[str, FileEntry] | None,
        error: CheckpointError | None,
        *,
        sequence: int | Callable[[], int],
        level: str,
        metrics: Mapping[str, float] | None = None,
        deep: DeepCheck | None = None,
        reread_all: bool = False,
        decoded: Mapping[str, Any] | None = None,
        written: Path | None = None,
        before_publish: Callable[[], None] | None = None,
        latest: bool = True,
    ) -> Published:
        """Steps 3: agree, then on the primary make the manifest and publish; every rank returns the result.

        `files`: what this rank wrote; None when a library wrote them and the primary adopts the
        files it finds (in `written`, a subdirectory of staging, when the library made one of its
        own). `sequence` (or a function the primary calls for it): the save's place in the run's
        order. `reread_all`: every rank re-read its files before the ranks agreed, so the commit's
        verification only stats them (`decoded`: files a rank decoded as well). `before_publish` runs on
        the primary just before the manifest is made.
        """
        try:
            every_rank = self.coord.agree(error, dict(files or {}), step=self.step)
            merged = {k: v for rank_files in every_rank for k, v in rank_files.items()}

            def commit() -> Published:
                if before_publish is not None:
                    before_publish()
                found = merged if files is not None else self._adopt(written)
                manifest = Manifest.new(
                    step=self.step, sequence=sequence() if callable(sequence) else sequence, files=found,
                    metrics=metrics, world_size=self.coord.world_size,
                )  # fmt: skip
                if written is not None:
                    self._staging.content = written
                published = self.committer.publish(
                    self._staging, manifest, level=level, deep=deep, decoded=decoded, latest=latest,
                    reread=frozenset(found) if reread_all else frozenset(),
                )  # fmt: skip
                return replace(published, report=None)  # what every rank needs, without the re-read's details

            return self.coord.on_primary(commit, step=self.step)
        except BaseException:
            self.discard()
            raise
        finally:
            if self.watch is not None:
                self.watch.abandon()

    def discard(self) -> None:
        """Drop the staging place (primary; never raises): a failed save leaves nothing behind."""
        if self.watch is not None:
            self.watch.abandon()
        if self._staging is not None:
            self.committer.discard(self._staging)

    def _adopt(self, written: Path | None) -> dict[str, FileEntry]:
        """The files a library wrote: fsynced and hashed (those the watch saw closed, already)."""
        where = written or self.path
        try:
            return writer.adopt_files(where, self.watch.finish() if self.watch is not None else None)
        except OSError as exc:
            what = f"could not make {exc.filename or 'the written files'} durable"
            raise from_os_error(WriteError, what, exc, path=self.where, step=self.step) from exc
        except ValueError as exc:  # a link or special file among the written ones
            raise WriteError(str(exc), path=self.where, step=self.step) from exc
