"""A CheckpointManager's object storage: where its local tier is, and the hooks it calls around each save.

Two modes, chosen by ``storage_options["mode"]``:

* ``tiered`` (default): every checkpoint is committed and verified on local disk first, then uploaded.
* ``direct``: for machines without local disk: each file is serialized from memory straight into its
  object, hashed on the way, then committed by the same marker protocol; nothing is written locally
  at save (one process only: the files of several ranks would need a remote staging area).

:func:`resolve` turns the manager's arguments into a local directory and a :class:`RemoteSpec`; the
manager then holds a tier: :class:`LocalOnly` (no URL) or a :class:`RemoteMirror`, opened by
:func:`open_tier`. What the manager sees (and all it sees of object storage):

* :meth:`RemoteMirror.open` at construction, before step 1: endpoint, bucket and credentials
  checked (typed errors), the lease taken, uploads a crash left uncommitted removed.
* :meth:`RemoteMirror.submit` after each local commit: the checkpoint's files are hard-linked
  aside (local retention may delete the directory meanwhile; the links keep its bytes), and one
  background thread uploads them. At most one upload is in flight: a second submit waits for it.
* A failed upload never touches the local checkpoint. It is logged to events.jsonl at once
  (``upload_failed``) and returned by the next :meth:`submit`, which the manager raises once that
  save stands locally (so handling UploadError costs no save), or raised by :meth:`close`.
* :meth:`resume_candidates` and :meth:`fetch` on restore: local checkpoints and the bucket's, newest
  first, each local one followed by the bucket's copy of the same save; a bucket checkpoint is
  downloaded only when its turn comes, hashed as it arrives, and committed locally; one that cannot
  be had intact, or does not load, is skipped for the next, on a fresh machine as on local disk.
* Remote retention is its own policy, applied after each upload (marker deleted first).
* In direct mode, :meth:`RemoteMirror.committer` in place of the local directory's: the save sends its
  files from memory and commits them by the marker (:class:`ckptguard.commit.remote_publish.BucketCommitter`),
  then :meth:`RemoteMirror.committed` indexes it and applies remote retention.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ckptguard.catalog import discovery, retention
from ckptguard.catalog.checkpoint import Checkpoint, save_order
from ckptguard.commit import publish, remote_publish
from ckptguard.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    InvalidURLError,
    UploadError,
)
from ckptguard.files.events import EventLog
from ckptguard.format.layout import checkpoint_name
from ckptguard.format.manifest import Manifest, ManifestError, read_manifest
from ckptguard.run.background import finish_before_pools_close
from ckptguard.run.pruning import Pruner
from ckptguard.s3 import locations
from ckptguard.s3.lease import Lease
from ckptguard.s3.objectstore import ObjectStore, RemoteURL, check_location, is_remote

log = logging.getLogger("ckptguard")
MODES = ("tiered", "direct")
CACHE_ENV = "CKPTGUARD_CACHE"


@dataclass(frozen=True)
class RemoteSpec:
    """A checked remote location: URL, options, mode and the bucket's retention (nothing touched yet)."""

    url: RemoteURL
    options: dict[str, Any]
    direct: bool
    policy: retention.RetentionPolicy


def resolve(
    run_dir: str | os.PathLike[str],
    remote: str | None,
    storage_options: Mapping[str, Any] | None,
    policy: retention.RetentionPolicy,
    remote_keep_last: int | None,
    world_size: int,
) -> tuple[Path, bool, RemoteSpec | None]:
    """(local directory, whether it is the default cache, the remote) of a manager; ValueError for bad input.

    ``CheckpointManager("s3://b/run")`` and ``CheckpointManager(local, remote="s3://b/run")`` are the
    same run: the first takes its local tier from ``storage_options["local_dir"]``, else from the cache
    ``$CKPTGUARD_CACHE/<endpoint>/<bucket>/<prefix>`` (default ``~/.cache/ckptguard``).
    """
    options = dict(storage_options or {})
    if is_remote(run_dir):
        if remote is not None:
            raise ValueError(f"run_dir {run_dir!r} is a URL already; drop remote={remote!r}")
        remote = str(run_dir)
    elif remote is None:
        if options:
            raise ValueError(f"storage_options apply to s3:// runs only; {run_dir!r} is a local directory")
        return Path(run_dir).absolute(), False, None
    elif "local_dir" in options:
        raise ValueError(f"two local directories: run_dir {run_dir!r} and storage_options['local_dir']")
    else:
        options["local_dir"] = run_dir
    url = check_location(remote, options)
    mode = options.pop("mode", "tiered")
    if mode not in MODES:
        raise ValueError(f"storage_options['mode'] must be one of {MODES}, got {mode!r}")
    if mode == "direct" and remote_keep_last is not None:
        raise ValueError("remote_keep_last applies to tiered runs; in direct mode keep_last is the bucket's retention")
    if mode == "direct" and world_size > 1:
        raise ValueError("direct-to-remote saving runs in one process; use the tiered mode with several ranks")
    local = options.pop("local_dir", None)
    remote_policy = policy if mode == "direct" else replace(policy, keep_last=remote_keep_last)
    spec = RemoteSpec(url, options, mode == "direct", remote_policy)
    if local is not None:
        return Path(local).absolute(), False, spec
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ckptguard"
    cache = Path(os.environ.get(CACHE_ENV) or default) / _endpoint_dir(options) / url.bucket / url.prefix
    return cache.absolute(), True, spec  # every part checked by RemoteURL.parse: it stays under the cache


def _endpoint_dir(options: Mapping[str, Any]) -> str:
    """The cache's folder for the endpoint a run talks to: the same bucket name on two endpoints is two runs.

    ``aws`` for AWS itself; else the endpoint's host and port, as boto3 takes them (the option, then
    the environment). InvalidURLError for a host that cannot be one directory name (``http://..``).
    """
    endpoint = (
        options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    if not endpoint:
        return "aws"
    host = urlsplit(str(endpoint)).netloc.replace(os.sep, "_") or "aws"
    problem = locations.part_problem(host, f"the endpoint {str(endpoint)!r}")
    if problem is not None:
        raise InvalidURLError(
            f"no cache directory for this endpoint: {problem}",
            path=str(endpoint),
            remedy="Set AWS_ENDPOINT_URL (or storage_options['endpoint_url']) to http(s)://HOST[:PORT], "
            "or give the run a local directory (storage_options['local_dir']).",
        )
    return host


def open_tier(spec: RemoteSpec | None, run_dir: Path, events: EventLog) -> LocalOnly | RemoteMirror:
    """The tier a manager saves through: endpoint, bucket, credentials and lease checked now, before step 1."""
    return LocalOnly(run_dir) if spec is None else RemoteMirror.open(spec, run_dir, events)


class LocalOnly:
    """The tier of a run without a URL: every hook does nothing."""

    direct = False

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def saved(self) -> list[remote_publish.RemoteCheckpoint]:
        return []

    def submit(self, checkpoint: Path) -> CheckpointError | None:
        """Nothing to upload, so no earlier upload can have failed."""
        return None

    def resume_candidates(self, step: int | None, path: str | os.PathLike[str] | None) -> list[str]:
        return discovery.restore_candidates(self.run_dir, step, path)

    def fetch(self, url: str) -> str:
        """Never called: a local run's candidates are all directories."""
        raise CheckpointNotFoundError(f"{url} is not part of a local run", path=url)

    def checkpoints(self) -> list[remote_publish.RemoteCheckpoint]:
        """No bucket, no remote checkpoints."""
        return []

    def close(self) -> None:
        """Nothing to wait for or release."""


class RemoteMirror:
    """The remote copy of one run directory: uploads, remote retention, fetch on resume."""

    def __init__(self, store: ObjectStore, lease: Lease, run_dir: Path, events: EventLog, spec: RemoteSpec) -> None:
        self.store = store
        self.direct = spec.direct
        self.run_dir = run_dir
        # remote retention, through the same committer as an upload (marker first), fenced by the lease
        self.pruner: Pruner[remote_publish.RemoteCheckpoint] = Pruner(
            remote_publish.BucketCommitter(store, lease.renew, events), spec.policy, events, remote=True
        )
        self._lease = lease
        self._events = events
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptguard-upload")
        self._pending: Future[None] | None = None
        self._failure: CheckpointError | None = None
        self._resumable: dict[str, remote_publish.RemoteCheckpoint] = {}
        self._pid = os.getpid()
        finish_before_pools_close(self)

    @classmethod
    def open(cls, spec: RemoteSpec, run_dir: Path, events: EventLog) -> RemoteMirror:
        """Check access, take the lease, remove uncommitted uploads, index what is committed."""
        store = ObjectStore(spec.url, spec.options)
        store.check_access()
        lease = Lease(store)
        lease.acquire()
        try:
            found = remote_publish.discover(store)
            removed = remote_publish.remove_uncommitted(store, found, lease.renew)
        except BaseException:
            lease.release()
            raise
        mirror = cls(store, lease, run_dir, events, spec)
        mirror.pruner.reindex(found)
        if removed:
            log.warning("removed %d uncommitted upload(s) from %s: %s", len(removed), store.url, removed)
        events.emit(
            "remote_preflight",
            url=str(store.url),
            mode=MODES[spec.direct],
            checkpoints=len(mirror.index),
            removed=removed,
        )
        return mirror

    @property
    def index(self) -> dict[str, remote_publish.RemoteCheckpoint]:
        """The bucket's committed checkpoints by name, as indexed at open and kept current since."""
        return self.pruner.index

    def saved(self) -> list[remote_publish.RemoteCheckpoint]:
        return list(self.index.values())

    # ---- uploads -----------------------------------------------------------------------------------

    def submit(self, checkpoint: Path) -> CheckpointError | None:
        """Upload a just-committed local checkpoint in the background (after the previous upload ends).

        Returns the failure of an earlier upload not yet reported, for the caller to raise now that
        this checkpoint stands locally: a caller that handles UploadError loses no save by it.
        """
        self._finish_pending()
        earlier, self._failure = self._failure, None
        try:
            manifest = read_manifest(checkpoint)
            source = _link_aside(checkpoint, manifest.files)
        except (OSError, ManifestError) as exc:
            self._fail(UploadError(f"cannot prepare the upload: {exc}", path=checkpoint), checkpoint.name)
            return earlier
        self._pending = self._pool.submit(self._upload, source, checkpoint.name, manifest)
        return earlier

    def _upload(self, source: Path, name: str, manifest: Manifest) -> None:
        try:
            sent = remote_publish.upload(
                self.store, source, name, manifest, fence=self._lease.renew, events=self._events
            )
        except Exception as exc:  # whatever it is, the local checkpoint stands: report it, never lose it
            self._fail(remote_publish.upload_error(exc, self.store.where(name), manifest.step, None), name)
            return
        finally:
            publish.discard_staging(source)
        self._committed(name, manifest, sent)

    def committer(self) -> remote_publish.BucketCommitter:
        """Direct mode: the committer a save sends its files through, fenced by this run's lease."""
        return remote_publish.BucketCommitter(
            self.store, self._lease.renew, self._events, remedy=remote_publish.DIRECT_REMEDY
        )

    def committed(self, name: str, manifest: Manifest) -> None:
        """Direct mode, after a save committed `name` in the bucket: index it, log it, apply remote retention."""
        self._committed(name, manifest, manifest.total_bytes)

    def _committed(self, name: str, manifest: Manifest, sent: int) -> None:
        self._events.emit("upload", step=manifest.step, url=self.store.where(name), bytes=sent)
        self.pruner.after_commit(_as_remote(self.store, name, manifest))  # a failed delete is logged only

    def _fail(self, error: CheckpointError, name: str) -> None:
        log.error("%s: %s", type(error).__name__, error)
        self._events.emit("upload_failed", step=error.step, name=name, error=type(error).__name__, message=str(error))
        self._failure = error

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # _upload records its own failure; this only waits

    def finish_at_exit(self) -> None:
        """At interpreter exit: end the upload in flight (its failure is already in events.jsonl), not in a fork."""
        if os.getpid() == self._pid:
            self._finish_pending()
            if self._failure is not None:
                log.error("an upload failed and was never reported: %s", self._failure)

    def close(self) -> None:
        """Wait for the upload in flight, release the lease, raise a failure not yet reported."""
        try:
            self._finish_pending()
        finally:
            self._pool.shutdown(wait=True)
            self._lease.release()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    # ---- resume ------------------------------------------------------------------------------------

    def checkpoints(self) -> list[remote_publish.RemoteCheckpoint]:
        """Every checkpoint in the bucket, quick-verified, in step order."""
        return remote_publish.discover(self.store)

    def resume_candidates(self, step: int | None, path: str | os.PathLike[str] | None) -> list[str]:
        """What restore tries, newest first: local directories and bucket URLs (fetched when their turn comes).

        A checkpoint the local tier holds comes first, and the bucket's copy of the same save right
        after it: a local copy damaged since its commit (a flipped bit that only a hash shows) falls
        back to the intact one in the bucket before any older save is taken. A bucket checkpoint
        newer than every local one (a fresh machine) comes before them all.
        """
        if path is not None:
            return discovery.restore_candidates(self.run_dir, None, path)
        local = [c for c in discovery.discover(self.run_dir) if step in (None, c.step)]
        remote = [c for c in remote_publish.discover(self.store) if step in (None, c.step)]
        self._resumable = {c.url: c for c in remote if c.valid}
        for c in remote:
            if not c.valid:  # logged like a local checkpoint that fails to load: the run's log says why
                log.warning("ignoring invalid checkpoint %s: %s", c.url, c.reason)
                self._events.emit("resume_skip", path=c.url, reason=c.reason)
        if step is not None and not self._resumable and not local:
            raise CheckpointNotFoundError(
                f"no checkpoint of step {step} here or in the bucket (valid steps: {self._valid_steps() or 'none'})",
                path=self.store.where(checkpoint_name(step)),
                step=step,
            )
        ordered = [(*save_order(c), 1, str(c.path)) for c in local if c.valid or step is not None]
        ordered += [(*save_order(c), 0, c.url) for c in remote if c.valid]  # the same save: the local copy first
        return [where for *_, where in sorted(ordered, reverse=True)]

    def _valid_steps(self) -> list[int]:
        return sorted(
            {c.step for c in discovery.discover(self.run_dir) if c.valid} | {c.step for c in self.index.values()}
        )

    def fetch(self, url: str) -> str:
        """Download a bucket checkpoint named by :meth:`resume_candidates` into the local tier; its path.

        Hashed as it arrives and committed locally through publish (a damaged local copy of the same
        name is set aside, not overwritten). CorruptCheckpointError when it cannot be had intact, so
        restore goes on to the next candidate.
        """
        c = self._resumable[url]
        path = remote_publish.download(self.store, c, self.run_dir, self._events)
        self._events.emit("download", step=c.step, url=c.url, path=path, bytes=c.bytes)
        self.pruner.protected.add(c.name)
        return str(path)


def _as_remote(store: ObjectStore, name: str, manifest: Manifest) -> remote_publish.RemoteCheckpoint:
    return remote_publish.RemoteCheckpoint(
        name=name,
        url=store.where(name),
        step=manifest.step,
        valid=True,
        manifest=manifest,
        **Checkpoint.facts(manifest),
    )


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
