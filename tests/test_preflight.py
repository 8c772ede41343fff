"""Preflight: an unusable run directory fails at construction, before step 1, saying where and what to do.

Every fault is real: a process without root's permission bypass against a mode 555 directory, a
read-only mount, a file where the directory should be, a missing parent, a tmpfs too small for one
checkpoint or short of inodes, a second process holding the lock. The headline messages are pinned
because they are what users paste into a search box.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from ckptguard import CheckpointManager, verify_checkpoint
from ckptguard.errors import InsufficientSpaceError, LockedError, NotWritableError
from faultkit import construct_in_child, manager_in_child, remount_read_only, tmpfs

METADATA = {".ckptguard.lock", ".ckptguard.lock.owner", "events.jsonl"}


def _not_writable(run_dir: Path, **kwargs: object) -> NotWritableError:
    with pytest.raises(NotWritableError) as info:
        CheckpointManager(run_dir, **kwargs)
    return info.value


@pytest.mark.parametrize("exists", [True, False], ids=["run-dir-555", "parent-555"])
def test_permission_denied_for_an_unprivileged_process(tmp_path: Path, exists: bool) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)  # mkdir's mode is filtered by the umask
    run_dir = locked if exists else locked / "run"
    try:
        outcome = construct_in_child(run_dir, unprivileged=True)
    finally:
        locked.chmod(0o755)
    assert outcome["type"] == "NotWritableError", outcome
    assert outcome["errno"] == errno.EACCES
    what = "cannot write files in the run directory" if exists else "cannot create the run directory"
    assert outcome["text"].startswith(f"{what}: Permission denied [path={run_dir}")
    assert outcome["remedy"] == "Permission denied: chown/chmod the directory or choose another path."
    assert list(locked.iterdir()) == []  # not even a lock file or a probe was left behind


def test_read_only_mount_fails_at_construction(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        (disk / "run").mkdir()
        remount_read_only(disk)
        remedy = "The filesystem is mounted read-only: remount it read-write or choose another path."
        for run_dir, what in [
            (disk / "run", "cannot write files in the run directory"),
            (disk / "new", "cannot create the run directory"),
        ]:
            error = _not_writable(run_dir)
            assert error.errno == errno.EROFS
            assert str(error).startswith(f"{what}: Read-only file system [path={run_dir}")
            assert error.remedy == remedy


def test_run_path_that_is_a_file_fails_at_construction(tmp_path: Path) -> None:
    run_file = tmp_path / "run"
    run_file.write_text("not a directory")
    error = _not_writable(run_file)
    assert error.errno == errno.ENOTDIR
    assert str(error) == (
        f"the run directory path is a file, not a directory [path={run_file}, errno=ENOTDIR (Not a directory)]. "
        "Remedy: Choose another output directory, or move the file away."
    )
    assert run_file.read_text() == "not a directory"


def test_missing_parent_fails_unless_create_parents(tmp_path: Path) -> None:
    run_dir = tmp_path / "typo" / "deeper" / "run"
    error = _not_writable(run_dir)
    assert error.errno == errno.ENOENT
    assert error.message == f"the parent directory {tmp_path / 'typo'} does not exist"
    assert error.path == str(run_dir)
    assert error.remedy == "Create it (mkdir -p), fix a typo in the path, or pass create_parents=True."
    assert not (tmp_path / "typo").exists()  # a typo in a mount path must not create a tree
    CheckpointManager(run_dir, create_parents=True).close()
    assert run_dir.is_dir()


def test_checkpoint_larger_than_the_disk_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="2m") as disk:
        run_dir = disk / "run"
        with pytest.raises(InsufficientSpaceError) as info:
            CheckpointManager(run_dir, keep_last=2, expected_bytes=4 << 20)
        error = info.value
        assert error.errno == errno.ENOSPC and error.path == str(run_dir)
        assert re.fullmatch(
            r"2\.0 MiB free but 2 retained checkpoint\(s\) plus one in flight needs 12\.0 MiB", error.message
        ), error.message
        assert "Remedy: Free space, lower keep_last" in str(error)
        assert set(os.listdir(run_dir)) <= METADATA  # no checkpoint, no staging, no probe
        # the refused manager let go of the lock: a run with a fitting estimate starts
        CheckpointManager(run_dir, keep_last=2, expected_bytes=256 << 10).close()


def test_too_few_inodes_is_refused_at_construction(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="64m", nr_inodes=24) as disk:
        with pytest.raises(InsufficientSpaceError) as info:
            CheckpointManager(disk / "run", keep_last=2, expected_bytes=1 << 20)
        assert info.value.errno == errno.ENOSPC
        assert re.fullmatch(
            r"\d+ free inodes but 2 retained checkpoint\(s\) plus one in flight needs \d+ files",
            info.value.message,
        ), info.value.message
        assert "Free inodes" in info.value.remedy


def test_second_process_on_the_same_run_dir_gets_a_lock_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with CheckpointManager(run_dir):
        outcome = construct_in_child(run_dir)
    assert outcome["type"] == "LockedError", outcome
    assert outcome["path"] == str(run_dir / ".ckptguard.lock")
    assert re.match(
        rf"another process holds the run directory lock \(pid {os.getpid()} on \S+ since [\d: -]+\) \[path=",
        outcome["text"],
    ), outcome["text"]
    assert outcome["remedy"] == "Stop the other run, or choose a different output directory."


def test_lock_of_a_killed_process_is_free_again(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with manager_in_child(run_dir) as holder:
        with pytest.raises(LockedError, match=f"pid {holder.pid} on "):
            CheckpointManager(run_dir)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        CheckpointManager(run_dir).close()  # the kernel dropped the dead holder's lock


def test_leftover_staging_is_removed_at_start_and_logged(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    CheckpointManager(run_dir).close()
    leftovers = [".staging-checkpoint-7-0badc0de", ".trash-checkpoint-3-0badc0de"]
    for name in leftovers:
        (run_dir / name / "state").mkdir(parents=True)
        (run_dir / name / "state" / "model.safetensors").write_bytes(b"\0" * 1000)
    with CheckpointManager(run_dir) as mgr:
        assert not [p.name for p in run_dir.iterdir() if p.name.startswith((".staging-", ".trash-"))]
        assert mgr.list() == []
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    cleanups = [e for e in events if e["event"] == "cleanup"]
    assert len(cleanups) == 1 and sorted(cleanups[0]["removed"]) == sorted(leftovers)


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its content (None for directories): what 'unchanged' means."""
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("where", ["the checkpoint", "inside it"])
def test_a_run_directory_in_a_checkpoint_is_refused_and_the_checkpoint_stays_valid(tmp_path: Path, where: str) -> None:
    from ckptguard import PreflightError, verify_checkpoint

    with CheckpointManager(tmp_path / "run") as mgr:
        ckpt = mgr.save(1, {"w": torch.ones(4)}).path
    before = _tree(ckpt)
    target = ckpt if where == "the checkpoint" else ckpt / "state" / "nested"
    with pytest.raises(PreflightError, match="would add files to that checkpoint") as info:
        CheckpointManager(target, create_parents=True)
    assert str(tmp_path / "run") in info.value.remedy
    assert _tree(ckpt) == before and verify_checkpoint(ckpt, "full").ok


def test_a_run_directory_whose_paths_would_be_too_long_fails_at_construction(tmp_path: Path) -> None:
    # Leave room for the run directory itself but not for the longest path a save creates in it.
    run = tmp_path
    while len(str(run)) < 4096 - 120:
        run = run / ("d" * min(200, 4096 - 120 - len(str(run)) - 1))
    os.makedirs(run)
    error = _not_writable(run)
    assert error.errno == errno.ENAMETOOLONG, error
    assert not [p for p in run.iterdir() if p.name.startswith(".ckptguard-probe-")], "the probe cleaned up"


def test_a_second_manager_in_the_same_process_is_told_so(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "run"), pytest.raises(LockedError, match="another CheckpointManager in this"):
        CheckpointManager(tmp_path / "run")


def test_entries_that_only_look_like_leftovers_do_not_stop_the_start(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".LATEST.tmp-mine").mkdir()  # a directory where a temp *file* would be
    (run / ".staging-notes").write_text("a file where a staging *directory* would be")
    (run / ".trash-link").symlink_to(tmp_path)
    with CheckpointManager(run) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
    assert (run / ".LATEST.tmp-mine").is_dir() and (run / ".staging-notes").is_file()
    assert (run / ".trash-link").is_symlink() and tmp_path.is_dir()


@pytest.mark.parametrize("depth", [1, 2], ids=["run-dir", "run-dir-and-parent"])
def test_a_run_dir_created_by_preflight_survives_a_power_cut_after_the_first_save(tmp_path: Path, depth: int) -> None:
    """mkdir is a change to the parent directory: without an fsync of the parent, a power cut after the first
    acknowledged save loses the whole run directory (the save fsyncs only the run directory itself)."""
    from powerkit import power_cut_disk

    with power_cut_disk(tmp_path) as fs:
        run_dir = fs.mountpoint.joinpath(*["exp"] * depth)
        mgr = CheckpointManager(run_dir, create_parents=True)
        mgr.save(1, {"model": {"w": torch.arange(8.0)}})
        mgr.close()
        fs.cut()
        fs.mount()
        report = verify_checkpoint(run_dir / "checkpoint-1", "full")
        assert report.ok, report.reason
