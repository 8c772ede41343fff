"""A restarted job on a bucket resumes: a writer that exits without close() frees its lease at exit, one
that was killed on this host is taken over at once, one on another host is waited for until its lease
expires, and a live writer is still refused. Real child processes against the S3 server on 127.0.0.1;
"another host" is a child in a UTS namespace of its own (unshare --uts) with another host name."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ckptguard import CheckpointManager
from ckptguard.errors import LockedError
from ckptguard.format.layout import LEASE_NAME, MARKER_NAME
from ckptguard.s3.lease import holder, process_start, this_place
from ckptguard.s3.objectstore import ObjectStore
from s3kit import RemoteRun, child_env

# Takes the lease, saves step 1, says "holding", then either blocks on stdin until killed once step 1 is
# uploaded ("hold") or ends without close() with the save still in flight ("background").
_WRITER = """
import sys, torch
from ckptguard import CheckpointManager
url, local, ttl, how = sys.argv[1:]
mgr = CheckpointManager(url, storage_options={"local_dir": local, "lease_ttl_s": float(ttl)})
torch.manual_seed(1)
mgr.save(1, {"model": torch.nn.Linear(256, 256)}, blocking=how != "background")
if how == "hold":
    mgr._run.tier._finish_pending()  # uploaded: what a rerun restores
print("holding", mgr._run.tier._lease.holder, flush=True)
if how == "hold":
    sys.stdin.read()
"""


def _elsewhere(cmd: list[str]) -> list[str]:
    """`cmd` as a process on "another host": a UTS namespace of its own, host name `elsewhere`."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("another host name for one process needs root and unshare(1) (util-linux)")
    return ["unshare", "--uts", "sh", "-c", 'hostname elsewhere && exec "$@"', "sh", *cmd]


@contextmanager
def _writer(
    remote: RemoteRun, local: Path, how: str, *, ttl: float = 300.0, elsewhere: bool = False
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A writer process holding the run's lease (killed on the way out); yields it and its lease's holder."""
    cmd = [sys.executable, "-c", _WRITER, remote.url, str(local), str(ttl), how]
    child = subprocess.Popen(
        _elsewhere(cmd) if elsewhere else cmd,
        env=child_env(remote.server), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert line[:1] == ["holding"], child.communicate()[1]
        yield child, line[1]
    finally:
        child.kill()
        child.communicate()


def _opens(remote: RemoteRun, local: Path, **options: float) -> CheckpointManager:
    return CheckpointManager(remote.url, storage_options={"local_dir": str(local), **options})


def _restores_step_1(mgr: CheckpointManager) -> None:
    restored = mgr.restore({"model": torch.nn.Linear(256, 256)})
    assert restored is not None and restored.step == 1


def test_a_writer_that_exits_without_close_frees_its_lease_after_its_last_upload(
    remote: RemoteRun, tmp_path: Path
) -> None:
    """A restore-only script or a loop that forgot close(): the save in flight at exit is finished and uploaded,
    then the lease is released, and the next run on the URL starts at once."""
    with _writer(remote, tmp_path / "a", "background") as (child, _):
        assert child.wait(timeout=600) == 0, child.communicate()[1]
    assert LEASE_NAME not in remote.objects()
    assert f"checkpoint-1/{MARKER_NAME}" in remote.objects()  # the upload ended before the lease was let go
    with _opens(remote, tmp_path / "b", lease_wait_s=0) as mgr:  # no waiting: the lease is free
        _restores_step_1(mgr)


def test_a_writer_killed_on_this_host_is_taken_over_at_once_not_after_its_ttl(
    remote: RemoteRun, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _writer(remote, tmp_path / "a", "hold") as (child, dead):
        child.kill()
        child.wait()
    held = holder(ObjectStore(remote.url))
    assert held is not None and held[0] == dead and held[1] > time.time() + 200  # minutes left on its TTL
    with caplog.at_level(logging.WARNING, "ckptguard"), _opens(remote, tmp_path / "b", lease_wait_s=0) as mgr:
        assert holder(ObjectStore(remote.url))[0] == mgr._run.tier._lease.holder  # type: ignore[index]
        _restores_step_1(mgr)
    assert f"taking over the lease (that process has ended) of {dead}" in caplog.text


def test_a_live_writer_on_this_host_is_refused_at_once(remote: RemoteRun, tmp_path: Path) -> None:
    with _writer(remote, tmp_path / "a", "hold") as (_, live):
        started = time.monotonic()
        with pytest.raises(LockedError, match=re.escape(f"({live})")) as refused:
            _opens(remote, tmp_path / "b")  # the default wait is the 300 s TTL: a wait would hang here
        assert "its process runs on this host" in refused.value.message
        assert time.monotonic() - started < 60  # refused, not waited for
        assert holder(ObjectStore(remote.url))[0] == live  # type: ignore[index]


def test_a_writer_killed_on_another_host_is_waited_for_until_its_lease_expires(
    remote: RemoteRun, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _writer(remote, tmp_path / "a", "hold", ttl=3, elsewhere=True) as (child, dead):
        child.kill()
        child.wait()
    assert dead.startswith("elsewhere:")
    expires = holder(ObjectStore(remote.url))[1]  # type: ignore[index]
    with caplog.at_level(logging.WARNING, "ckptguard"), _opens(remote, tmp_path / "b", lease_ttl_s=3) as mgr:
        assert time.time() > expires  # taken only once the dead writer's lease had expired
        _restores_step_1(mgr)
    assert re.search(rf"held by {re.escape(dead)}, which this host cannot see; waiting \d+ s", caplog.text)
    assert f"taking over the stale lease of {dead}" in caplog.text


def test_a_live_writer_on_another_host_is_refused_once_it_renews(remote: RemoteRun, tmp_path: Path) -> None:
    with _writer(remote, tmp_path / "a", "hold", ttl=3, elsewhere=True) as (_, live):
        with pytest.raises(LockedError, match="renewed the lease while this run waited") as refused:
            _opens(remote, tmp_path / "b", lease_ttl_s=3)
        assert f"({live})" in refused.value.message
        with pytest.raises(LockedError, match=re.escape("past storage_options lease_wait_s=0")):
            _opens(remote, tmp_path / "c", lease_wait_s=0)  # no wait asked for: refused at once
        assert holder(ObjectStore(remote.url))[0] == live  # type: ignore[index]


def test_a_pid_that_now_names_another_process_is_a_dead_holder(remote: RemoteRun, tmp_path: Path) -> None:
    """The lease of a killed writer whose pid a new process got: another start time, so not the holder."""
    forged = {
        "holder": f"here:{os.getpid()}:feedbeef", "expires": time.time() + 300, "ttl_s": 300,
        "place": this_place(), "pid": os.getpid(), "started": str(int(process_start(os.getpid()) or 0) - 1),
    }  # fmt: skip
    remote.tamper(LEASE_NAME, json.dumps(forged).encode())
    with _opens(remote, tmp_path / "b", lease_wait_s=0) as mgr:
        assert holder(ObjectStore(remote.url))[0] == mgr._run.tier._lease.holder  # type: ignore[index]


_FORKS = """
import os, sys, torch
from ckptguard import CheckpointManager
from ckptguard.s3.lease import holder
url, local = sys.argv[1:]
mgr = CheckpointManager(url, storage_options={"local_dir": local})
pid = os.fork()
if pid == 0:
    sys.exit(0)  # the child's interpreter exits normally: its atexit hooks run
os.waitpid(pid, 0)
print(holder(mgr._run.tier.store)[0] == mgr._run.tier._lease.holder)
mgr.close()
"""


def test_a_forked_child_that_exits_leaves_its_parents_lease_held(remote: RemoteRun, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FORKS, remote.url, str(tmp_path / "a")],
        env=child_env(remote.server), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]
    assert LEASE_NAME not in remote.objects()  # and the parent's close() released it


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "5", True])
def test_a_lease_wait_that_is_not_a_duration_is_refused_naming_it(
    remote: RemoteRun, tmp_path: Path, value: object
) -> None:
    with pytest.raises(ValueError, match=re.escape(f"storage_options lease_wait_s={value!r}: expected")):
        _opens(remote, tmp_path / "a", lease_wait_s=value)  # type: ignore[arg-type]
    assert LEASE_NAME not in remote.objects()
