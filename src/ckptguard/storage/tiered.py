"""Tiered saving: every checkpoint is committed and verified on local disk first, then uploaded.

What the manager sees (and all it sees of object storage):

* :meth:`RemoteMirror.open` at construction, before step 1: endpoint, bucket and credentials
  checked (typed errors), the lease taken, uploads a crash left uncommitted removed.
* :meth:`RemoteMirror.submit` after each local commit: the checkpoint's files are hard-linked
  aside (local retention may delete the directory meanwhile; the links keep its bytes), and one
  background thread uploads them. At most one upload is in flight: a second submit waits for it.
* A failed upload never touches the local checkpoint. It is logged to events.jsonl at once
  (``upload_failed``) and raised by :meth:`raise_failure` at the next save, or by :meth:`close`.
* :meth:`fetch_newer` on restore: a remote checkpoint newer than anything valid on local disk (a
  fresh machine) is downloaded, hashed as it arrives, and committed locally; a damaged one is
  skipped for the previous.
* Remote retention is its own policy, applied after each upload (marker deleted first).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ckptguard import discovery, publish, retention
from ckptguard.errors import CheckpointError, CorruptCheckpointError, RemoteError, UploadError
from ckptguard.events import EventLog
from ckptguard.manifest import Manifest, ManifestError, read_manifest
from ckptguard.storage import remote_publish
from ckptguard.storage.lease import Lease
from ckptguard.storage.objectstore import ObjectStore

log = logging.getLogger("ckptguard")


class RemoteMirror:
    """The remote copy of one run directory: uploads, remote retention, fetch on resume."""

    def __init__(
        self, store: ObjectStore, lease: Lease, run_dir: Path, events: EventLog, policy: retention.RetentionPolicy
    ) -> None:
        self.store = store
        self.run_dir = run_dir
        self.policy = policy
        self.protected: set[str] = set()
        self.index: dict[str, remote_publish.RemoteCheckpoint] = {}
        self._lease = lease
        self._events = events
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptguard-upload")
        self._pending: Future[None] | None = None
        self._failure: CheckpointError | None = None

    @classmethod
    def open(
        cls,
        url: str,
        storage_options: Mapping[str, Any] | None,
        run_dir: Path,
        events: EventLog,
        policy: retention.RetentionPolicy,
    ) -> RemoteMirror:
        """Check access, take the lease, remove uncommitted uploads, index what is committed."""
        store = ObjectStore(url, storage_options)
        store.check_access()
        lease = Lease(store)
        lease.acquire()
        try:
            found = remote_publish.discover(store)
            removed = remote_publish.remove_uncommitted(store, found)
        except BaseException:
            lease.release()
            raise
        mirror = cls(store, lease, run_dir, events, policy)
        mirror.index = {c.name: c for c in found if c.valid}
        if removed:
            log.warning("removed %d uncommitted upload(s) from %s: %s", len(removed), store.url, removed)
        events.emit("remote_preflight", url=str(store.url), checkpoints=len(mirror.index), removed=removed)
        return mirror

    @property
    def max_sequence(self) -> int:
        return max((c.sequence for c in self.index.values()), default=0)

    # ---- uploads -----------------------------------------------------------------------------------

    def submit(self, checkpoint: Path) -> None:
        """Upload a just-committed local checkpoint in the background (after the previous upload ends)."""
        self._finish_pending()
        try:
            manifest = read_manifest(checkpoint)
            source = _link_aside(checkpoint, manifest.files)
        except (OSError, ManifestError) as exc:
            self._fail(UploadError(f"cannot prepare the upload: {exc}", path=checkpoint), checkpoint.name)
            return
        self._pending = self._pool.submit(self._upload, source, checkpoint.name, manifest)

    def _upload(self, source: Path, name: str, manifest: Manifest) -> None:
        try:
            sent = remote_publish.upload(
                self.store, source, name, manifest, before_marker=self._lease.renew, events=self._events
            )
        except Exception as exc:  # whatever it is, the local checkpoint stands: report it, never lose it
            message = exc.message if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            error = exc if isinstance(exc, UploadError) else UploadError(f"could not upload {name}: {message}")
            error.path, error.step = error.path or self.store.where(name), manifest.step
            self._fail(error, name)
            return
        finally:
            publish.discard_staging(source)
        self.index[name] = _as_remote(self.store, name, manifest)
        self._events.emit("upload", step=manifest.step, url=self.store.where(name), bytes=sent)
        self._prune()

    def _fail(self, error: CheckpointError, name: str) -> None:
        log.error("%s: %s", type(error).__name__, error)
        self._events.emit("upload_failed", step=error.step, name=name, error=type(error).__name__, message=str(error))
        self._failure = error

    def _prune(self) -> None:
        """Remote retention after an upload: a failed delete is logged, never an upload failure."""
        for c in retention.doomed(list(self.index.values()), self.policy, frozenset(self.protected)):
            try:
                remote_publish.remove(self.store, c.name)
            except RemoteError as exc:
                log.warning("could not prune %s: %s", c.url, exc)
                self._events.emit("remote_prune_failed", url=c.url, message=str(exc))
                return
            self.index.pop(c.name, None)
            self._events.emit("remote_prune", step=c.step, url=c.url, bytes=c.bytes)

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # _upload records its own failure; this only waits

    def raise_failure(self) -> None:
        """Raise (once) the error of an upload that failed since the last call."""
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Wait for the upload in flight, release the lease, raise a failure not yet reported."""
        try:
            self._finish_pending()
        finally:
            self._pool.shutdown(wait=True)
            self._lease.release()
        self.raise_failure()

    # ---- resume ------------------------------------------------------------------------------------

    def fetch_for_resume(self, run_dir: Path) -> bool:
        """Before a resume: download the newest remote checkpoint newer than every local one, if any."""
        local = discovery.newest_first(discovery.discover(run_dir))
        return self.fetch_newer(local[0].sequence if local else -1) is not None

    def fetch_newer(self, local_sequence: int) -> Path | None:
        """Download the newest remote checkpoint saved after `local_sequence`, skipping damaged ones."""
        found = remote_publish.newest_first(remote_publish.discover(self.store))
        for c in (c for c in found if c.sequence > local_sequence):
            try:
                path = remote_publish.download(self.store, c, self.run_dir, self._events)
            except CorruptCheckpointError as exc:
                log.warning("skipping %s: %s", c.url, exc)
                self._events.emit("resume_skip", path=c.url, reason=str(exc))
                continue
            self._events.emit("download", step=c.step, url=c.url, path=path, bytes=c.bytes)
            self.protected.add(c.name)
            return path
        return None


def _as_remote(store: ObjectStore, name: str, manifest: Manifest) -> remote_publish.RemoteCheckpoint:
    return remote_publish.RemoteCheckpoint(
        name=name, url=store.where(name), step=manifest.step, valid=True, bytes=manifest.total_bytes,
        sequence=manifest.sequence, created=manifest.created, metrics=dict(manifest.metrics), manifest=manifest,
    )  # fmt: skip


def _link_aside(checkpoint: Path, files: Mapping[str, Any]) -> Path:
    """Hard links to a checkpoint's files in a staging directory (removed at the next start if left).

    Committed files are never rewritten in place, so the links hold exactly the committed bytes even
    after local retention deletes the checkpoint; a filesystem without hard links gets copies.
    """
    aside = publish.create_staging(checkpoint.parent, f"upload-{checkpoint.name}")
    for relpath in files:
        target = aside / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(checkpoint / relpath, target)
        except OSError:
            shutil.copyfile(checkpoint / relpath, target)
    return aside
