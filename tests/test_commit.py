"""commit.py: the only code that names, renames and removes checkpoint directories."""

import os

from ckptguard import CheckpointManager, commit
from ckptguard.events import read_events


def test_leftover_staging_and_trash_are_removed_at_start_and_logged(tmp_path):
    run = tmp_path / "run"
    with CheckpointManager(run) as mgr:
        mgr.save(1, {"x": 1})
    (run / ".staging-checkpoint-2-abcd").mkdir()
    (run / ".staging-checkpoint-2-abcd" / "state").mkdir()
    (run / ".trash-checkpoint-0-ffff").mkdir()
    with CheckpointManager(run) as mgr:
        assert mgr.latest().step == 1
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".") and "lock" not in p.name) == []
    cleanup = [e for e in read_events(run) if e["event"] == "cleanup"]
    assert cleanup and sorted(cleanup[0]["removed"]) == [".staging-checkpoint-2-abcd", ".trash-checkpoint-0-ffff"]


def test_latest_is_replaced_atomically_and_junk_in_it_is_ignored(tmp_path):
    commit.write_latest(tmp_path, "checkpoint-7")
    assert commit.read_latest(tmp_path) == "checkpoint-7"
    assert not [n for n in os.listdir(tmp_path) if n != "LATEST"], "no temp file left behind"
    (tmp_path / "LATEST").write_text("../../etc")
    assert commit.read_latest(tmp_path) is None


def test_remove_never_leaves_a_partial_checkpoint_name(tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / "state" / "f").write_bytes(b"1")
    commit.remove(ckpt)
    assert os.listdir(tmp_path) == []
