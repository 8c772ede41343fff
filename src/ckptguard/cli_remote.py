"""``ckptguard ls | verify | doctor | prune`` on ``s3://`` URLs: the object-storage side of :mod:`ckptguard.cli`.

Credentials and endpoint come from the environment (AWS_ENDPOINT_URL, AWS_PROFILE, ...), as for
any S3 tool. Pruning takes the run's lease first, so it never races a writer, and removes each
checkpoint marker first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ckptguard import retention
from ckptguard.errors import CheckpointError
from ckptguard.layout import step_from_name
from ckptguard.storage import remote_publish
from ckptguard.storage.lease import Lease, holder
from ckptguard.storage.objectstore import ObjectStore
from ckptguard.verify import VerifyReport


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


def verify_reports(url: str, level: str) -> list[VerifyReport]:
    """A remote checkpoint (s3://.../checkpoint-N) or every checkpoint of a remote run."""
    head, _, last = url.rstrip("/").rpartition("/")
    if step_from_name(last) is not None:
        return [remote_publish.verify(ObjectStore(head), last, level)]
    store = ObjectStore(url)
    return [remote_publish.verify(store, c.name, level) for c in remote_publish.discover(store)]


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
            remote_publish.remove(store, c.name)
    finally:
        lease.release()
    return doomed


def doctor(url: str, check: Callable[[str, bool, str], None]) -> None:
    """Can a run save at `url`? Endpoint, bucket and credentials; who holds the lease; the checkpoints."""
    try:
        store = ObjectStore(url)
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
    invalid = [c for c in found if not c.valid]
    check(
        "checkpoints",
        not invalid,
        f"{len(found) - len(invalid)} committed, {len(invalid)} invalid or uncommitted"
        + "".join(f"; {c.name}: {c.reason}" for c in invalid[:3]),
    )
