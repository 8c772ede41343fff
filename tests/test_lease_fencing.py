"""A writer that lost its lease costs no other writer a byte: fenced commits and prunes, create-only
writes, conditional deletes, and a renew loop that outlives its lease object. Against a real S3
server on 127.0.0.1; the paused writer is a real process stopped with SIGSTOP past its TTL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ckptguard import CheckpointManager
from ckptguard.commit import remote_publish
from ckptguard.errors import LockedError
from ckptguard.format.layout import LEASE_NAME, MARKER_NAME
from ckptguard.s3.lease import Lease, holder
from ckptguard.s3.objectstore import ObjectStore, PreconditionFailed
from faultkit import freeze
from s3kit import RemoteRun, child_env, freeze_renewals, wait_until_held_by, wait_until_stale

TTL = {"lease_ttl_s": 2.0}

# Saves and uploads step 1, says "ready", then saves step 2 once told "go" on stdin (it was SIGSTOPped
# in between, past its lease), and reports how each upload ended.
_PAUSED_WRITER = """
import json, sys, torch
from ckptguard import CheckpointManager
from ckptguard.errors import CheckpointError
local, url = sys.argv[1:]
mgr = CheckpointManager(local, remote=url, storage_options={"lease_ttl_s": 2.0}, keep_last=1, remote_keep_last=1)
torch.manual_seed(1)
state = {"model": torch.nn.Linear(16, 16)}
mgr.save(1, state)
mgr.wait()
mgr._run.tier._finish_pending()
print("ready", flush=True)
sys.stdin.readline()
errors = []
for call in (lambda: mgr.save(2, state), mgr.close):
    try:
        call()
    except CheckpointError as exc:
        errors.append([type(exc).__name__, exc.message])
print(json.dumps(errors), flush=True)
"""


def _snapshot(remote: RemoteRun) -> dict[str, tuple[int, str, bytes]]:
    """Every object of the run but the lease: (size, ETag, bytes)."""
    client, prefix = remote.server.client(), remote.url.removeprefix(f"s3://{remote.bucket}/") + "/"
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=remote.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            relpath = obj["Key"][len(prefix) :]
            if relpath != LEASE_NAME:
                found[relpath] = (obj["Size"], obj["ETag"], remote.read(relpath))
    return found


@pytest.mark.parametrize("new_holder_closed", [False, True], ids=["new-holder-running", "new-holder-released"])
def test_a_writer_paused_past_its_lease_deletes_and_overwrites_nothing_of_the_new_holder(
    tmp_path: Path, remote: RemoteRun, new_holder_closed: bool
) -> None:
    paused = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_WRITER, str(tmp_path / "a"), remote.url],
        env=child_env(remote.server), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert paused.stdout is not None and paused.stdin is not None
        assert paused.stdout.readline().strip() == "ready"
        freeze(paused)  # every thread of it, the renewals too
        store = ObjectStore(remote.url)
        paused_holder = holder(store)
        assert paused_holder is not None
        wait_until_stale(store)
        new = CheckpointManager(tmp_path / "b", remote=remote.url, storage_options=TTL, keep_last=1)
        held = holder(store)
        assert held is not None and held[0] != paused_holder[0], (held, paused_holder)  # taken over
        torch.manual_seed(2)
        new.save(2, {"model": torch.nn.Linear(16, 16)})  # the same name the paused writer will upload
        new._run.tier._finish_pending()
        if new_holder_closed:
            new.close()  # and releases the lease: the paused writer must not take a vanished lease as free
        before = _snapshot(remote)
        assert {"checkpoint-1/" + MARKER_NAME, "checkpoint-2/" + MARKER_NAME} <= set(before)
        paused.send_signal(signal.SIGCONT)
        paused.stdin.write("go\n")
        paused.stdin.flush()
        outcome = json.loads(paused.stdout.readline())
        assert paused.wait(timeout=120) == 0
    finally:
        paused.kill()
        paused.wait()
    assert _snapshot(remote) == before  # no byte of the new holder's checkpoints replaced or deleted
    assert outcome and outcome[0][0] == "LockedError" and "lost the lease" in outcome[0][1], outcome
    assert (tmp_path / "a" / "checkpoint-2").is_dir()  # the paused writer's own save stands locally
    report = remote_publish.verify(ObjectStore(remote.url), "checkpoint-2", "full")
    assert report.ok, report.reason
    if not new_holder_closed:
        new.close()


def test_a_lost_lease_fences_prune_and_clean_up_before_any_delete(remote: RemoteRun, tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "run", remote=remote.url, keep_last=3) as mgr:
        mgr.save(1, {"model": torch.nn.Linear(4, 4)})
    old_store = ObjectStore(remote.url, TTL)
    old = Lease(old_store)
    old.acquire()
    freeze_renewals(old)
    wait_until_stale(old_store)
    new = Lease(ObjectStore(remote.url, TTL))
    new.acquire()
    wait_until_held_by(old_store, new.holder)
    before = _snapshot(remote)
    with pytest.raises(LockedError, match="another writer took over the lease"):
        remote_publish.remove(old_store, "checkpoint-1", old.renew)
    found = remote_publish.discover(old_store)
    with pytest.raises(LockedError, match="lost the lease"):
        remote_publish.remove_uncommitted(old_store, [*found, _uncommitted("checkpoint-1")], old.renew)
    assert _snapshot(remote) == before
    old.release()  # not ours any more: the new holder's lease stays
    assert holder(old_store) is not None
    new.release()


def _uncommitted(name: str) -> remote_publish.RemoteCheckpoint:
    return remote_publish.RemoteCheckpoint(name=name, url=name, step=1, valid=False, reason=f"{MARKER_NAME}: missing")


def test_a_deleted_lease_is_lost_for_good_and_the_renew_thread_ends_cleanly(
    remote: RemoteRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_value))
    store = ObjectStore(remote.url, {"lease_ttl_s": 0.3})  # renews every 0.1 s
    lease = Lease(store)
    lease.acquire()
    remote.delete(LEASE_NAME)  # an operator, or a new holder that came and went
    assert lease._thread is not None
    lease._thread.join(timeout=60)  # ends once a renewal finds the lease gone
    assert not lease._thread.is_alive() and crashed == []
    with pytest.raises(LockedError, match="deleted while this writer held it"):
        lease.renew()
    assert holder(store) is None  # never re-created: another writer may have committed meanwhile
    lease.release()


def test_writes_are_create_only_single_and_multipart(remote: RemoteRun, tmp_path: Path) -> None:
    store = ObjectStore(remote.url, {"chunk_bytes": 5 << 20})
    theirs = b"another writer's object"
    remote.tamper("checkpoint-9/small", theirs)
    remote.tamper("checkpoint-9/large", theirs)
    mine = tmp_path / "large.bin"
    mine.write_bytes(b"x" * (6 << 20))  # two parts
    with pytest.raises(PreconditionFailed):
        store.put_bytes("checkpoint-9/small", b"mine")
    with pytest.raises(PreconditionFailed):
        store.upload_chunks("checkpoint-9/small", [b"mine"])
    with pytest.raises(PreconditionFailed):
        store.upload_file("checkpoint-9/large", mine)
    assert remote.read("checkpoint-9/small") == theirs and remote.read("checkpoint-9/large") == theirs
    assert store.upload_file("checkpoint-9/new", mine)[0] == 6 << 20  # a new name is written as ever


def test_a_delete_leaves_an_object_that_changed_since_it_was_listed(remote: RemoteRun) -> None:
    store = ObjectStore(remote.url)
    remote.tamper("checkpoint-3/a", b"1")
    remote.tamper("checkpoint-3/b", b"2")
    listed = {k: etag for k, (_, etag) in store.listing("checkpoint-3/").items()}
    remote.tamper("checkpoint-3/b", b"rewritten by another writer")
    with pytest.raises(PreconditionFailed, match="checkpoint-3/b"):
        store.delete(sorted(listed), listed)
    assert remote.objects("checkpoint-3/") == {"checkpoint-3/b": len(b"rewritten by another writer")}
