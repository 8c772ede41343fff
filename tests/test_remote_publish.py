"""The commit-by-marker protocol, the lease and the typed access errors, against a real S3 server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from ckptguard import CheckpointManager
from ckptguard.cli.main import main
from ckptguard.commit import remote_publish
from ckptguard.errors import (
    BucketNotFoundError,
    EndpointUnreachableError,
    LockedError,
    RemoteAuthError,
    RemoteError,
)
from ckptguard.files.events import read_events
from ckptguard.format.layout import LEASE_NAME, MARKER_NAME
from ckptguard.s3.lease import Lease
from ckptguard.s3.objectstore import ObjectStore
from conftest import make_training_state
from faultkit import free_port
from s3kit import RemoteRun, S3Server, freeze_renewals, new_run, use_server, wait_until_held_by, wait_until_stale

WEIGHTS = "state/model.safetensors"


def saved_run(tmp_path: Path, remote: RemoteRun, steps: tuple[int, ...] = (1, 2), **kwargs: Any) -> dict[str, Any]:
    """Save `steps` through a tiered manager (closed, so every upload finished); returns the state."""
    state = make_training_state()
    with CheckpointManager(tmp_path / "local", remote=remote.url, **kwargs) as mgr:
        for step in steps:
            mgr.save(step, state)
    return state


def test_upload_commits_data_then_manifest_then_marker_and_releases_lease(tmp_path: Path, remote: RemoteRun) -> None:
    saved_run(tmp_path, remote)
    keys = remote.objects()
    assert LEASE_NAME not in keys  # released at close
    marker = json.loads(remote.read(f"checkpoint-2/{MARKER_NAME}"))
    manifest = json.loads(remote.read("checkpoint-2/MANIFEST.json"))
    assert marker["sequence"] == manifest["sequence"] == 2
    assert {f"checkpoint-2/{p}" for p in manifest["files"]} | {
        f"checkpoint-2/{MARKER_NAME}",
        "checkpoint-2/MANIFEST.json",
    } == {k for k in keys if k.startswith("checkpoint-2/")}
    store = ObjectStore(remote.url)
    assert [(c.name, c.valid) for c in remote_publish.discover(store)] == [
        ("checkpoint-1", True),
        ("checkpoint-2", True),
    ]
    report = remote_publish.verify(store, "checkpoint-2", "full")
    assert report.ok and report.bytes_read == manifest["total_bytes"]


def test_missing_bucket_unreachable_endpoint_and_no_credentials_are_typed_before_step_1(
    tmp_path: Path, remote: RemoteRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "local"
    with pytest.raises(BucketNotFoundError, match="does not exist"):
        CheckpointManager(local, remote="s3://no-such-bucket-here/run")
    closed = f"http://127.0.0.1:{free_port()}"  # a port on 127.0.0.1 where nothing listens
    options = {"endpoint_url": closed, "connect_timeout": 1, "max_attempts": 1}
    with pytest.raises(EndpointUnreachableError, match="cannot be reached"):
        CheckpointManager(local, remote=remote.url, storage_options=options)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RemoteAuthError, match="no credentials"):
        CheckpointManager(local, remote=remote.url)
    assert not (local / "checkpoint-1").exists()
    kinds = [e["error"] for e in read_events(local) if e["event"] == "preflight" and "error" in e]
    assert kinds == ["BucketNotFoundError", "EndpointUnreachableError", "RemoteAuthError"]
    CheckpointManager(local).close()  # each failure released the local lock


def test_refused_credentials_are_a_remote_auth_error_naming_the_bucket_before_step_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    server = S3Server(auth=True)  # checks every signature against its own IAM users
    request.addfinalizer(server.stop)
    use_server(monkeypatch, server)
    remote = new_run(server)
    saved_run(tmp_path, remote, steps=(1,))  # the kit's own key is accepted
    for variable, value in (("AWS_SECRET_ACCESS_KEY", "not-the-secret"), ("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY")):
        monkeypatch.setenv(variable, value)
        with pytest.raises(RemoteAuthError, match=f"credentials were refused on bucket '{remote.bucket}'") as raised:
            CheckpointManager(remote.url, storage_options={"local_dir": str(tmp_path / "b")})
        assert raised.value.path == remote.url and "AWS_ACCESS_KEY_ID" in raised.value.remedy
    assert not list((tmp_path / "b").glob("checkpoint-*"))


def test_second_writer_on_a_remote_run_gets_locked_error(tmp_path: Path, remote: RemoteRun) -> None:
    first = CheckpointManager(tmp_path / "a", remote=remote.url)
    with pytest.raises(LockedError, match="another writer holds the lease"):
        CheckpointManager(tmp_path / "b", remote=remote.url)
    first.close()
    CheckpointManager(tmp_path / "b", remote=remote.url).close()  # free once the first one closed


def test_stale_lease_is_taken_over_and_the_old_holder_cannot_commit(remote: RemoteRun) -> None:
    ttl = {"lease_ttl_s": 2.0}
    old = Lease(ObjectStore(remote.url, ttl))
    old.acquire()
    freeze_renewals(old)  # the holder stops renewing, as a frozen or partitioned writer would
    wait_until_stale(old.store)  # a live lease refuses a second writer: test_second_writer_... above
    new = Lease(ObjectStore(remote.url, ttl))
    new.acquire()
    wait_until_held_by(old.store, new.holder)  # the takeover, as the bucket records it
    with pytest.raises(LockedError, match="took over the lease"):
        old.renew()  # what an upload does right before its marker
    new.release()


def test_damaged_lease_is_never_guessed_stale(remote: RemoteRun) -> None:
    remote.tamper(LEASE_NAME, b"{not json")
    with pytest.raises(LockedError, match="damaged"):
        Lease(ObjectStore(remote.url)).acquire()


def test_tampered_object_is_named_by_verify_and_resume_takes_the_previous(
    tmp_path: Path, remote: RemoteRun, capsys: pytest.CaptureFixture[str]
) -> None:
    saved_run(tmp_path, remote)
    data = bytearray(remote.read(f"checkpoint-2/{WEIGHTS}"))
    data[-1] ^= 1
    remote.tamper(f"checkpoint-2/{WEIGHTS}", bytes(data))
    assert main(["verify", f"{remote.url}/checkpoint-2"]) == 1
    out = capsys.readouterr().out
    assert f"INVALID  {remote.url}/checkpoint-2 (full)" in out and f"{WEIGHTS}: content hash mismatch" in out
    assert main(["verify", remote.url, "--level", "quick"]) == 0  # same size: only the hash can tell
    fresh = tmp_path / "fresh"
    with CheckpointManager(fresh, remote=remote.url) as mgr:
        restored = mgr.restore(make_training_state(seed=1))
    assert restored is not None and restored.step == 1
    skipped = [e for e in read_events(fresh) if e["event"] == "resume_skip"]
    assert len(skipped) == 1 and WEIGHTS in skipped[0]["reason"] and "hash mismatch" in skipped[0]["reason"]
    assert sorted(p.name for p in fresh.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]


def test_truncated_object_makes_the_checkpoint_invalid_in_ls(
    tmp_path: Path, remote: RemoteRun, capsys: pytest.CaptureFixture[str]
) -> None:
    saved_run(tmp_path, remote)
    remote.tamper(f"checkpoint-2/{WEIGHTS}", remote.read(f"checkpoint-2/{WEIGHTS}")[:100])
    assert main(["ls", remote.url, "--json"]) == 0
    rows = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert rows["checkpoint-1"]["valid"] and not rows["checkpoint-2"]["valid"]
    assert rows["checkpoint-2"]["reason"].startswith(f"{WEIGHTS}: size 100 bytes, manifest says")


class _CrashAfterFirstDelete(ObjectStore):
    """The real store, except that the process 'dies' after its first delete request."""

    def delete(self, relpaths: list[str], etags: Mapping[str, str] | None = None) -> None:
        if getattr(self, "_deleted", False):
            raise RemoteError("simulated crash between the deletes of a prune")
        super().delete(relpaths, etags)
        self._deleted = True


def test_prune_deletes_the_marker_first_so_an_interrupted_prune_leaves_nothing_committed(
    tmp_path: Path, remote: RemoteRun
) -> None:
    saved_run(tmp_path, remote)
    lease = Lease(ObjectStore(remote.url))
    lease.acquire()
    with pytest.raises(RemoteError, match="simulated crash"):
        remote_publish.remove(_CrashAfterFirstDelete(remote.url), "checkpoint-1", lease.renew)
    lease.release()
    left = remote.objects("checkpoint-1/")
    assert f"checkpoint-1/{MARKER_NAME}" not in left and f"checkpoint-1/{WEIGHTS}" in left
    found = {c.name: c for c in remote_publish.discover(ObjectStore(remote.url))}
    assert not found["checkpoint-1"].valid and found["checkpoint-2"].valid
    CheckpointManager(tmp_path / "next", remote=remote.url).close()  # the next writer clears the remnant
    assert remote.objects("checkpoint-1/") == {}


def test_remote_retention_is_separate_from_local(tmp_path: Path, remote: RemoteRun) -> None:
    saved_run(tmp_path, remote, steps=(1, 2, 3, 4), keep_last=1, remote_keep_last=2)
    local = sorted(p.name for p in (tmp_path / "local").iterdir() if p.name.startswith("checkpoint"))
    assert local == ["checkpoint-4"]
    committed = sorted(k.split("/")[0] for k in remote.objects() if k.endswith(f"/{MARKER_NAME}"))
    assert committed == ["checkpoint-3", "checkpoint-4"]
    assert not {k for k in remote.objects() if k.startswith(("checkpoint-1/", "checkpoint-2/"))}


def test_cli_prune_on_a_url_removes_marker_first_and_waits_for_the_writer(
    tmp_path: Path, remote: RemoteRun, capsys: pytest.CaptureFixture[str]
) -> None:
    saved_run(tmp_path, remote, steps=(1, 2, 3))
    assert main(["prune", remote.url, "--keep-last", "1", "--dry-run"]) == 0
    assert "would remove 2 checkpoint(s)" in capsys.readouterr().out
    writer = CheckpointManager(tmp_path / "writer", remote=remote.url)
    assert main(["prune", remote.url, "--keep-last", "1"]) == 2  # LockedError: a writer runs
    assert "LockedError" in capsys.readouterr().err
    writer.close()
    assert main(["prune", remote.url, "--keep-last", "1"]) == 0
    assert sorted({k.split("/")[0] for k in remote.objects()}) == ["checkpoint-3"]


def test_a_missing_bucket_exits_2_from_ls_verify_prune_and_export_with_one_message(
    tmp_path: Path, remote: RemoteRun, capsys: pytest.CaptureFixture[str]
) -> None:
    """One cause, one exit code and one line: export opens the run as ls does, so a script can tell bad input."""
    url = "s3://no-such-bucket-here/run"
    errors = {}
    for command in (["ls", url], ["verify", url], ["prune", url, "--keep-last", "1"],
                    ["export", url, "--out", str(tmp_path / "out")],
                    ["export", f"{url}/checkpoint-5", "--out", str(tmp_path / "out")]):  # fmt: skip
        assert main(command) == 2, command
        errors[command[0]] = capsys.readouterr().err
    assert errors["ls"].startswith("error: BucketNotFoundError: ")
    assert "the bucket 'no-such-bucket-here' does not exist" in errors["ls"]
    assert errors["export"] == errors["ls"]
    assert not (tmp_path / "out").exists()


def test_cli_doctor_on_a_url(tmp_path: Path, remote: RemoteRun, capsys: pytest.CaptureFixture[str]) -> None:
    saved_run(tmp_path, remote, steps=(1,))
    remote.tamper("checkpoint-5/state/model.safetensors", b"half an upload")
    assert main(["doctor", remote.url, "--json"]) == 1
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["access"]["ok"] and checks["lease"]["detail"] == "no writer holds the run"
    assert not checks["checkpoints"]["ok"] and "1 committed, 1 invalid" in checks["checkpoints"]["detail"]
    assert main(["doctor", "s3://no-such-bucket-here/run"]) == 1
    assert "FAIL  access       BucketNotFoundError" in capsys.readouterr().out


def test_an_object_deleted_while_verify_downloads_is_named_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing names it and the manifest lists it, then it is gone at its GET: a verify failure, no traceback."""
    import subprocess
    import sys

    import torch

    from s3kit import child_env, wait_for

    server = S3Server(download_bytes_per_s=4 << 20)  # a 16 MiB object takes about 4 s to arrive
    try:
        use_server(monkeypatch, server)
        remote = new_run(server)
        state = {"model": torch.nn.Linear(2048, 2048), "optimizer": {"lr": 0.1}}  # model sorts before trainer_state
        with CheckpointManager(tmp_path / "local", remote=remote.url) as mgr:
            mgr.save(1, state)
        small = "state/trainer_state.json"
        assert sorted(remote.objects("checkpoint-1/state/")) == [f"checkpoint-1/{WEIGHTS}", f"checkpoint-1/{small}"]
        before = server.sent_to_clients()
        verify = subprocess.Popen(
            [sys.executable, "-m", "ckptguard", "verify", f"{remote.url}/checkpoint-1"],
            env=child_env(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for(lambda: server.sent_to_clients() - before > 4 << 20, "verify downloading the 16 MiB object")
        remote.delete(f"checkpoint-1/{small}")  # listed, manifest read: now gone before its GET
        out, err = verify.communicate(timeout=600)
    finally:
        server.stop()
    assert verify.returncode == 1, err
    assert "Traceback" not in err
    assert f"{small}: deleted while it was being verified (listed, then gone)" in out
    assert f"{remote.url}/checkpoint-1" in out
