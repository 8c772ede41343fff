"""The commit protocol for a checkpoint that is one file (a Lightning ``.ckpt``): the only module that creates and
renames checkpoint files. :class:`FileCommitter` is its :class:`ckptguard.commit.base.Committer`.

The library writes its archive to ``.partial-{name}-{nonce}`` in the checkpoint's directory (same
filesystem, so the rename is atomic; the name never ends in ``.ckpt``, so a glob for checkpoints never
meets it). :meth:`FileCommitter.publish` then (1) appends the manifest as the archive's last record
(``ckptguard.format.ckpt_file``), (2) fsyncs the file, (3) verifies it, (4) renames it over
``{name}`` and (5) fsyncs the directory. Verification comes before the rename because the rename
replaces what the name held: a file that fails it is moved aside (``{name}.corrupt-<time>-<id>``) and
the previous checkpoint of that name is still there. A kill at any instant leaves the old file or the
new one under the name, never part of one; a leftover partial file is removed at the next start
(:func:`ckptguard.commit.publish.clean_leftovers`). There is no LATEST: the library's own ``last.ckpt``
is its pointer, and the newest is found by the manifests' save sequence.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptguard.catalog.verify import verify_checkpoint
from ckptguard.commit import publish
from ckptguard.commit.base import DeepCheck, Published
from ckptguard.errors import UnsupportedStateError, VerificationError, WriteError, from_os_error
from ckptguard.files.durable import fsync_dir
from ckptguard.files.writer import FilePlan
from ckptguard.format import ckpt_file
from ckptguard.format.layout import PARTIAL_PREFIX
from ckptguard.format.manifest import FileEntry, Manifest


def create_staging_file(parent: Path, name: str) -> Path:
    """A fresh, empty partial file for checkpoint `name` inside `parent`, created exclusively."""
    staging = parent / f"{PARTIAL_PREFIX}{name}-{secrets.token_hex(4)}"
    os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return staging


def record_files(staging: Path, step: int | None) -> dict[str, FileEntry]:
    """The records of the archive a library wrote to `staging`, hashed: the files of its manifest.

    Read back once, from the page cache; the archive is indexed as hostile input (a library that wrote
    something else than a zip archive fails the save here, with WriteError naming the record)."""
    try:
        with open(staging, "rb") as fh:
            return ckpt_file.record_entries(fh, ckpt_file.read_archive(fh))
    except ckpt_file.ArchiveError as exc:
        what = f"the file written is not a checkpoint archive: {exc.record}: {exc.reason}"
        raise WriteError(what, path=staging, step=step) from exc
    except OSError as exc:
        what = "could not read back the checkpoint file"
        raise from_os_error(WriteError, what, exc, path=staging, step=step) from exc


@dataclass
class FileStaging:
    """One save's partial file; `name` is the checkpoint file it becomes."""

    name: str
    where: Path

    def write(self, plans: Sequence[FilePlan]) -> dict[str, FileEntry]:
        raise UnsupportedStateError(
            "a checkpoint file is one archive its library writes; it has no planned files", path=self.where
        )


class FileCommitter(publish.LocalCommitter):
    """Checkpoints as files of `parent`: a partial file beside them, completed with its manifest, renamed into place."""

    def begin(self, name: str) -> FileStaging:
        return FileStaging(name, create_staging_file(self.ready(), name))

    def publish(
        self,
        staging: FileStaging,
        manifest: Manifest,
        *,
        level: str,
        deep: DeepCheck | None = None,
        reread: frozenset[str] = frozenset(),
        decoded: Mapping[str, Any] | None = None,
        latest: bool = True,
    ) -> Published:
        """Steps 1-5 of the module's docstring; WriteError (OS errors) or VerificationError, the partial file gone."""
        if latest or deep is not None:
            raise ValueError("a checkpoint file has no LATEST and no deep level (nothing in it is loaded to compare)")
        target, step = self.parent / staging.name, manifest.step
        try:
            with open(staging.where, "r+b") as fh:
                ckpt_file.append_manifest(fh, ckpt_file.read_archive(fh), manifest.to_json_bytes())
                os.fsync(fh.fileno())
        except (OSError, ckpt_file.ArchiveError) as exc:
            self.discard(staging)
            if isinstance(exc, OSError):
                raise from_os_error(WriteError, "could not add the manifest", exc, path=target, step=step) from exc
            raise WriteError(f"could not add the manifest: {exc.reason}", path=target, step=step) from exc
        report = verify_checkpoint(staging.where, level, reread=reread)
        if self.events is not None:
            self.events.emit(
                "verify", step=step, path=target, level=level, ok=report.ok, bytes=report.bytes_read,
                seconds=report.seconds, problems=[str(p) for p in report.problems],
            )  # fmt: skip
        if not report.ok:
            moved = publish.quarantine(target, "corrupt", source=staging.where)
            raise VerificationError(
                f"failed {level} verification right after writing ({report.reason}); moved aside to {moved.name}",
                path=target,
                step=step,
            )
        try:
            os.rename(staging.where, target)
            fsync_dir(self.parent)
        except OSError as exc:
            self.discard(staging)
            raise from_os_error(WriteError, "could not commit the checkpoint", exc, path=target, step=step) from exc
        return Published(target, manifest, None, report)

    def discard(self, staging: FileStaging) -> None:
        with contextlib.suppress(OSError):
            os.unlink(staging.where)
