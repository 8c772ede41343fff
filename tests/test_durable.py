"""durable.py: atomic_write_bytes leaves the old content or the new, never a mix and never a stray temporary,
on a real full disk, a real read-only mount and for a real process without root's permission bypass."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest

from ckptguard.files.durable import atomic_write_bytes, fsync_dir, fsync_file
from faultkit import Filler, python_cmd, remount_read_only, tmpfs


def test_a_write_replaces_the_content_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "LATEST"
    atomic_write_bytes(target, b"checkpoint-1\n")
    atomic_write_bytes(target, b"checkpoint-22\n")
    assert target.read_bytes() == b"checkpoint-22\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_a_full_disk_keeps_the_old_content_and_removes_the_temporary(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        target = disk / "LATEST"
        atomic_write_bytes(target, b"old\n")
        filler = Filler(disk)
        filler.leave_bytes(0)
        with pytest.raises(OSError) as raised:
            atomic_write_bytes(target, b"x" * (256 << 10))
        assert raised.value.errno == errno.ENOSPC
        assert target.read_bytes() == b"old\n"
        assert sorted(p.name for p in disk.iterdir()) == ["LATEST", "filler-inodes", "filler.bin"]
        filler.release()


def test_a_read_only_mount_raises_erofs_and_keeps_the_old_content(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        atomic_write_bytes(disk / "LATEST", b"old\n")
        remount_read_only(disk)
        with pytest.raises(OSError) as raised:
            atomic_write_bytes(disk / "LATEST", b"new\n")
        assert raised.value.errno == errno.EROFS
        assert (disk / "LATEST").read_bytes() == b"old\n"


_UNPRIVILEGED = """
import json, sys
from pathlib import Path
from ckptguard.files.durable import atomic_write_bytes
try:
    atomic_write_bytes(Path(sys.argv[1]), b"new\\n")
    print(json.dumps({"errno": None}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno}))
"""


def test_a_process_without_permission_gets_eacces_and_the_old_content_stays(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    atomic_write_bytes(run / "LATEST", b"old\n")
    run.chmod(0o555)
    try:
        done = subprocess.run(python_cmd(_UNPRIVILEGED, str(run / "LATEST"), unprivileged=True),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        run.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["errno"] == errno.EACCES
    assert (run / "LATEST").read_bytes() == b"old\n"
    assert sorted(p.name for p in run.iterdir()) == ["LATEST"]


def test_fsync_helpers_sync_real_files_and_directories_and_refuse_missing_ones(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    fsync_file(tmp_path / "f")
    assert fsync_dir(tmp_path) is True
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")
