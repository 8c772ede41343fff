"""The commit's early hashes (rank 0 hashes each file a library closes while it writes the next) never decide
what a checkpoint holds: whatever a library does to a file after closing it, the manifest describes the
file as the commit finds it."""

from __future__ import annotations

import os
import threading

import pytest

from ckptguard import verify_checkpoint
from ckptguard.dist import Coordinator
from ckptguard.errors import WriteError
from ckptguard.integrations import staged

SIZE = 4 << 20


def _watch(save):
    return save.watch


def _save(run_dir, write, step=1):
    """One staged save of `step` whose library is `write(staging, watch)`; the committed checkpoint."""
    coord = Coordinator(60)
    save = staged.begin(coord, run_dir, step)
    write(save.path, _watch(save))
    return staged.finish(save, None)


def _writes(*names):
    """A library that writes `names` (4 MiB each, in new subdirectories where they say so) and closes them,
    one after another."""

    def write(staging, watch):
        for name in names:
            path = staging / name
            if not path.parent.is_dir():
                path.parent.mkdir()
                assert watch.wait_heard(path.parent)  # watched before its file is written
            path.write_bytes(os.urandom(SIZE))
            assert watch.wait_heard(path, closes=1)  # inotify works on this mount: the early path is taken

    return write


def test_a_file_patched_after_its_close_through_a_handle_still_open_is_hashed_as_it_ends(tmp_path):
    """Same size, the modification time put back by hand, and no second close before the commit: only the
    write itself tells that the hash taken at the first close is stale."""
    coord = Coordinator(60)
    save = staged.begin(coord, tmp_path, 1)
    staging = save.path
    path = staging / "weights.bin"
    path.write_bytes(os.urandom(SIZE))
    assert _watch(save).wait_heard(path, closes=1)  # its early hash is taken: the patch below makes it stale
    before = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(SIZE // 2)
        fh.write(b"patched")
        fh.flush()
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        target = staged.finish(save, None)
    report = verify_checkpoint(target, "full")
    assert report.ok, report.reason


def test_files_written_under_a_temporary_name_and_renamed_are_hashed_under_their_own(tmp_path):
    def write(staging, watch):
        for closes, name in enumerate(("model.bin", "optimizer.bin"), 1):
            (staging / "part.tmp").write_bytes(os.urandom(SIZE))
            assert watch.wait_heard(staging / "part.tmp", closes)  # hashed under the temporary name first
            os.rename(staging / "part.tmp", staging / name)
        (staging / "sub").mkdir()
        (staging / "sub" / "state.json").write_text("{}")

    target = _save(tmp_path, write)
    report = verify_checkpoint(target, "full")
    assert report.ok, report.reason
    assert set(report.manifest.files) == {"model.bin", "optimizer.bin", "sub/state.json"}


def test_a_failed_save_leaves_no_watch_running(tmp_path):
    coord = Coordinator(60)
    save = staged.begin(coord, tmp_path, 1)
    staging = save.path
    (staging / "weights.bin").write_bytes(os.urandom(SIZE))
    with pytest.raises(WriteError):
        staged.finish(save, WriteError("the library failed", step=1))
    assert not staging.exists()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("ckptguard-close")]


def test_a_file_closed_and_left_alone_is_hashed_by_the_watch_with_the_commits_digest(tmp_path):
    """What makes the commit faster: the watch hears the close and its digest is the file's."""
    from ckptguard.files.closewatch import CloseWatch
    from ckptguard.files.hashing import hash_file

    watch = CloseWatch(tmp_path)
    (tmp_path / "sub").mkdir()
    assert watch.wait_heard(tmp_path / "sub")  # the watch adds the new directory when it hears of it
    written = [tmp_path / "model.bin", tmp_path / "sub" / "optimizer.bin"]
    for path in written:
        path.write_bytes(os.urandom(SIZE))
    early = watch.finish()
    assert early == {path: hash_file(path) for path in written}


def test_a_power_cut_right_after_the_commit_keeps_every_file_the_watch_synced_early(tmp_path, monkeypatch):
    """The commit neither fsyncs nor hashes again a file the watch fsynced and hashed: on a filesystem that
    forgets every unsynced byte at a power cut, those files must still be whole after the reboot."""
    from ckptguard.files import writer
    from powerkit import power_cut_disk

    synced_by_commit, fsync_file = [], writer.fsync_file
    monkeypatch.setattr(writer, "fsync_file", lambda path: (synced_by_commit.append(path), fsync_file(path)))
    with power_cut_disk(tmp_path) as fs:
        run_dir = fs.mountpoint / "run"
        target = _save(run_dir, _writes("model.bin", "sub/optimizer.bin"))
        staged.close_run(Coordinator(60), run_dir)
        assert synced_by_commit == [], "the commit synced again what the watch had synced"
        fs.cut()
        fs.mount()
        report = verify_checkpoint(target, "full")
        assert report.ok, report.reason
        assert set(report.manifest.files) == {"model.bin", "sub/optimizer.bin"}


def test_a_writeback_error_at_the_early_fsync_fails_the_save_though_a_second_fsync_would_pass(tmp_path):
    """Linux reports a failed writeback to one fsync only and counts the pages clean after it: a commit that
    fsynced again after the watch's early fsync failed would pass, and commit a file that is not on disk."""
    from powerkit import power_cut_disk

    with power_cut_disk(tmp_path) as fs:
        run_dir = fs.mountpoint / "run"
        _save(run_dir, _writes("model.bin"))
        fs.fail_next_fsync("optimizer.bin")
        with pytest.raises(WriteError) as caught:
            _save(run_dir, _writes("model.bin", "optimizer.bin"), step=2)
        assert "optimizer.bin" in str(caught.value) and "EIO" in str(caught.value), caught.value
        assert not (run_dir / "checkpoint-2").exists()
        assert staged.newest_verified(run_dir) == run_dir / "checkpoint-1"
        staged.close_run(Coordinator(60), run_dir)
        fs.cut()
        fs.mount()
        assert staged.newest_verified(run_dir) == run_dir / "checkpoint-1"
        report = verify_checkpoint(run_dir / "checkpoint-1", "full")
        assert report.ok, report.reason
