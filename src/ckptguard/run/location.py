"""``ckptguard ls | verify | doctor | prune | export`` on ``s3://`` URLs: the object-storage side of the CLI.

Credentials and endpoint come from the environment (AWS_ENDPOINT_URL, AWS_PROFILE, ...), as for
any S3 tool. Pruning takes the run's lease first, so it never races a writer, and removes each
checkpoint marker first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptguard.catalog import retention
from ckptguard.catalog.checkpoint import newest_first
from ckptguard.catalog.listing import checkpoints_check
from ckptguard.catalog.verify import VerifyReport
from ckptguard.commit import remote_publish
from ckptguard.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ckptguard.files.events import EventLog
from ckptguard.format.layout import step_from_name
from ckptguard.s3.lease import Lease, holder
from ckptguard.s3.objectstore import ObjectStore, RemoteURL


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
    doomed = retention.doomed(remote_publish.discover(store), policy)
    if dry_run or not doomed:
        return doomed
    lease = Lease(store)
    lease.acquire()  # LockedError while a writer runs: its own retention is in charge then
    try:
        for c in doomed:
            remote_publish.remove(store, c.name, lease.renew)
    finally:
        lease.release()
    return doomed


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
