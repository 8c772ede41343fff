"""Where the CLI's ``ls | verify | doctor | prune | export`` work: a local run directory or a run in a bucket.

:func:`open_location` is the one place that tells them apart; each command then asks the same
questions of either (:class:`LocalRun`, :class:`BucketRun`) and prints the answers. On a bucket,
credentials and endpoint come from the environment (AWS_ENDPOINT_URL, AWS_PROFILE, ...), as for any S3
tool, and pruning takes the run's lease first, so it never races a writer, and removes each marker first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptguard.catalog import retention
from ckptguard.catalog.checkpoint import newest_first
from ckptguard.catalog.listing import checkpoints_check
from ckptguard.catalog.verify import VerifyReport
from ckptguard.commit import remote_publish
from ckptguard.commit.publish import DirCommitter
from ckptguard.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ckptguard.files.events import EventLog
from ckptguard.format.layout import MANIFEST_NAME, step_from_name
from ckptguard.run.pruning import Pruner
from ckptguard.s3.lease import Lease, holder
from ckptguard.s3.objectstore import ObjectStore, RemoteURL, is_remote


def ls_json(url: str) -> tuple[list[remote_publish.RemoteCheckpoint], dict[str, Any]]:
    """The checkpoints of a remote run and the JSON `ls --json` prints for them."""
    store = ObjectStore(url)
    found = remote_publish.discover(store)
    rows = [
        {"name": c.name, "step": c.step, "valid": c.valid, "reason": c.reason, "bytes": c.bytes,
         "metrics": c.metrics, "sequence": c.sequence, "url": c.url}
        for c in found
    ]  # fmt: skip
    return found, {"url": str(store.url), "checkpoints": rows}


def _locate(url: str) -> tuple[ObjectStore, str | None]:
    """The run of a URL and the checkpoint it names: s3://.../checkpoint-N, or None for a whole run."""
    head, _, last = url.removesuffix("/").rpartition("/")
    if step_from_name(last) is not None:
        return ObjectStore(head), last
    return ObjectStore(url), None


def verify_reports(url: str, level: str) -> list[VerifyReport]:
    """A remote checkpoint (s3://.../checkpoint-N) or every checkpoint of a remote run."""
    store, name = _locate(url)
    names = [name] if name is not None else [c.name for c in remote_publish.discover(store)]
    return [remote_publish.verify(store, n, level) for n in names]


@dataclass(frozen=True)
class RemoteSource:
    """A remote run as `ls` reads it, and the checkpoint a URL names in it (None: the newest committed one)."""

    url: str
    store: ObjectStore
    name: str | None
    found: list[remote_publish.RemoteCheckpoint]


def find(url: str) -> RemoteSource:
    """Open the run of `url` and list it: a bad URL, a missing bucket, refused credentials fail here, as in `ls`."""
    store, name = _locate(url)
    return RemoteSource(url, store, name, remote_publish.discover(store))


def download(source: RemoteSource, into: Path) -> Path:
    """The checkpoint `source` names, or the newest committed one of its run, downloaded into `into`.

    Every object is hashed as it arrives and compared with the manifest (CorruptCheckpointError naming it).
    """
    found, name = source.found, source.name
    chosen = [c for c in found if c.name == name] if name is not None else newest_first(found)[:1]
    if not chosen:
        committed = [c.name for c in found if c.valid]
        raise CheckpointNotFoundError(f"no such checkpoint (committed here: {committed or 'none'})", path=source.url)
    if not chosen[0].valid:
        raise CorruptCheckpointError(f"not a committed checkpoint: {chosen[0].reason}", path=chosen[0].url)
    return remote_publish.download(source.store, chosen[0], into, EventLog(into, enabled=False))


def prune(url: str, policy: retention.RetentionPolicy, *, dry_run: bool) -> list[remote_publish.RemoteCheckpoint]:
    """Remove the committed checkpoints `policy` does not keep (marker first), holding the lease."""
    store = ObjectStore(url)
    found = remote_publish.discover(store)
    lease = Lease(store)
    pruner: Pruner[remote_publish.RemoteCheckpoint] = Pruner(
        remote_publish.BucketCommitter(store, lease.renew), policy, None, remote=True
    )
    doomed = pruner.prune(found, dry_run=True)
    if dry_run or not doomed:
        return doomed
    lease.acquire()  # LockedError while a writer runs: its own retention is in charge then
    try:
        return pruner.prune(found)
    finally:
        lease.release()


def doctor(url: str, check: Callable[[str, bool, str], None]) -> None:
    """Can a run save at `url`? Endpoint, bucket and credentials; who holds the lease; the checkpoints."""
    parsed = RemoteURL.parse(url)  # a bad URL is bad input (exit 2), not a failed check
    try:
        store = ObjectStore(parsed)
        store.check_access()
    except CheckpointError as exc:
        check("access", False, f"{type(exc).__name__}: {exc.message}; {exc.remedy}")
        return
    check("access", True, f"bucket {store.url.bucket!r} reachable, listing allowed")
    try:
        held = holder(store)
    except CheckpointError as exc:  # a damaged lease: say so, and go on to the checkpoints
        check("lease", False, f"{exc.message}; {exc.remedy}")
    else:
        if held is None:
            check("lease", True, "no writer holds the run")
        else:
            state = "held by a running writer" if held[1] > time.time() else "stale (its writer is gone)"
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held[1]))
            check("lease", True, f"{state}: {held[0]}, expiry {when}")
    found = remote_publish.discover(store)
    check("checkpoints", *checkpoints_check(found, "committed", "invalid or uncommitted"))


class Unusable(Exception):
    """The location given is not one the command can work on (bad usage, exit 2); the message says why."""


@dataclass(frozen=True)
class Listing:
    """What ``ls`` shows of a run: its checkpoints, why each is kept, and the document ``--json`` prints."""

    where: str
    found: list[Any]
    keep: dict[str, list[str]]
    doc: dict[str, Any]
    latest: str | None = None
    aside: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Pruned:
    """What ``prune`` removed (or, dry run, would remove): checkpoints, and directories set aside as superseded."""

    doomed: list[Any]
    aside: list[Any] = field(default_factory=list)


class BucketRun:
    """A run in a bucket (``s3://bucket/prefix``), or one checkpoint of it (``.../checkpoint-N``)."""

    def __init__(self, url: str) -> None:
        self.where = url

    def ls(self) -> Listing:
        found, doc = ls_json(self.where)
        return Listing(doc["url"], found, retention.plan(found, retention.RetentionPolicy()), doc)

    def verify(self, level: str) -> list[VerifyReport]:
        return verify_reports(self.where, level)

    def doctor(self, check: Callable[[str, bool, str], None]) -> None:
        doctor(self.where, check)

    def prune(self, policy: retention.RetentionPolicy, *, dry_run: bool, superseded: bool) -> Pruned:
        return Pruned(prune(self.where, policy, dry_run=dry_run))  # a bucket has no set-aside directories

    def opened(self) -> Callable[[Path], Path]:
        """Open and list the run now (its failures are the caller's); then a function fetching the checkpoint."""
        source = find(self.where)
        return lambda into: download(source, into)


class LocalRun:
    """A run directory, or one checkpoint directory of it."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.path = Path(where)

    def _directory(self) -> Path:
        if not self.path.is_dir():
            raise Unusable(f"{self.path} is not a directory")
        return self.path

    def ls(self) -> Listing:
        from ckptguard.catalog import discovery, listing
        from ckptguard.commit import publish

        run_dir = self._directory()
        found = discovery.discover(run_dir)
        keep = listing.keep_reasons(run_dir, found)
        latest = publish.read_latest(run_dir)
        aside = discovery.set_aside(run_dir)
        doc = {
            "run_dir": str(run_dir.absolute()),
            "latest": latest,
            "checkpoints": [
                {"name": c.name, "step": c.step, "valid": c.valid, "reason": c.reason, "bytes": c.bytes,
                 "metrics": c.metrics, "sequence": c.sequence, "keep_reasons": keep.get(c.name, [])}
                for c in found
            ],
            "set_aside": [{"name": a.name, "step": a.step, "kind": a.kind} for a in aside],
        }  # fmt: skip
        return Listing(str(run_dir), found, keep, doc, latest, aside)

    def verify(self, level: str) -> list[VerifyReport]:
        from ckptguard.catalog import discovery
        from ckptguard.catalog.verify import verify_checkpoint

        path = self.path
        if not path.is_dir():
            what = "does not exist" if not path.exists() else "is not a directory"
            raise Unusable(f"{path} {what}; give a checkpoint directory or a run directory")
        if (path / MANIFEST_NAME).exists() or step_from_name(path.name) is not None:
            targets = [path]  # a checkpoint directory itself
        else:  # every checkpoint of a run directory
            targets = [c.path for c in discovery.discover(path)] or [path]
        return [verify_checkpoint(p, level) for p in targets]

    def doctor(self, check: Callable[[str, bool, str], None]) -> None:
        from ckptguard.run import doctor as local_doctor

        local_doctor.check_directory(self.path.absolute(), check)

    def prune(self, policy: retention.RetentionPolicy, *, dry_run: bool, superseded: bool) -> Pruned:
        from ckptguard.catalog import discovery, listing
        from ckptguard.run.manager import CheckpointManager

        run_dir = self._directory()
        if dry_run:
            pruner: Pruner[discovery.CheckpointInfo] = Pruner(DirCommitter(run_dir), policy, None)
            pruner.protected = set(listing.run_policy(run_dir)[1])
            aside = [a for a in discovery.set_aside(run_dir) if a.kind == "superseded"] if superseded else []
            return Pruned(pruner.prune(discovery.discover(run_dir), dry_run=True), aside)
        with CheckpointManager(
            run_dir, keep_last=policy.keep_last, keep_best=policy.keep_best, metric=policy.metric, mode=policy.mode,
            keep_every=policy.keep_every,
        ) as mgr:  # fmt: skip
            return Pruned(mgr.prune(), mgr.prune_superseded() if superseded else [])

    def opened(self) -> Callable[[Path], Path]:
        return lambda into: self.path


def open_location(where: str) -> LocalRun | BucketRun:
    """The one place the CLI tells a bucket URL from a local path."""
    return BucketRun(where) if is_remote(where) else LocalRun(where)
