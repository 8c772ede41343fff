"""publish.py: the only code that creates, renames and removes checkpoint and staging directories."""

import os
import time
from pathlib import Path

import pytest

from ckptguard import CheckpointManager, VerificationError, save_lora_adapters
from ckptguard.commit import publish
from ckptguard.files import writer
from ckptguard.files.durable import atomic_write_bytes
from ckptguard.format.layout import STATE_FILE
from conftest import make_lora_model, make_training_state


def test_latest_is_replaced_atomically_and_junk_in_it_is_ignored(tmp_path):
    atomic_write_bytes(tmp_path / "LATEST", b"checkpoint-7\n")
    assert publish.read_latest(tmp_path) == "checkpoint-7"
    assert not [n for n in os.listdir(tmp_path) if n != "LATEST"], "no temp file left behind"
    (tmp_path / "LATEST").write_text("../../etc")
    assert publish.read_latest(tmp_path) is None


def test_remove_never_leaves_a_partial_checkpoint_name(tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / "state" / "f").write_bytes(b"1")
    publish.remove(ckpt)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")], "gone at once, by rename"
    deadline = time.monotonic() + 30
    while os.listdir(tmp_path) and time.monotonic() < deadline:  # the space is freed in the background
        time.sleep(0.01)
    assert os.listdir(tmp_path) == []


def test_a_discarded_staging_directory_is_never_made_again_by_a_rank_still_writing(tmp_path):
    """Ranks write their own files beside the sharded write; when the save fails elsewhere, rank 0 discards
    staging while another rank may still be writing. That rank's next file fails (ENOENT) instead of making
    the staging directory again, so nothing of the failed save is left in the run directory."""
    from ckptguard.files.writer import FilePlan

    staging = publish.create_staging(tmp_path, "checkpoint-2")
    plan = FilePlan("state/rank1/rng.json", data=b"{}\n")
    writer.write_file(staging, plan)
    publish.discard_staging(staging)
    with pytest.raises(FileNotFoundError):
        writer.write_file(staging, plan)
    assert os.listdir(tmp_path) == []


def _damage_after_rename(monkeypatch, target: Path, relpath: str) -> None:
    """Test-only hook: right after `target` is renamed into place, flip a byte of one of its files on disk.

    The fsync of the parent directory follows the rename in the protocol, so the damage lands
    between the write and the verification, as a bad disk or a stray writer would put it there.
    """
    real_fsync_dir = publish.fsync_dir

    def fsync_then_damage(path):
        if Path(path) == target.parent and target.is_dir():
            victim = target / relpath
            data = bytearray(victim.read_bytes())
            data[-1] ^= 0xFF
            victim.write_bytes(bytes(data))
        return real_fsync_dir(path)

    monkeypatch.setattr(publish, "fsync_dir", fsync_then_damage)


def test_a_checkpoint_damaged_before_verification_is_moved_aside_and_never_resumed(tmp_path, monkeypatch):
    """The trainer state is parsed after the rename (its step must agree), so damage there is caught there."""
    run = tmp_path / "run"
    state = make_training_state()
    with CheckpointManager(run) as mgr:
        mgr.save(1, state)
        _damage_after_rename(monkeypatch, run / "checkpoint-2", STATE_FILE)
        with pytest.raises(VerificationError, match=r"content hash mismatch.*moved aside to checkpoint-2\.corrupt-"):
            mgr.save(2, state)
        monkeypatch.undo()
        assert [c.name for c in mgr.list()] == ["checkpoint-1"], "the quarantined directory is no checkpoint"
    names = sorted(os.listdir(run))
    assert "checkpoint-2" not in names and any(n.startswith("checkpoint-2.corrupt-") for n in names), names
    assert publish.read_latest(run) == "checkpoint-1"
    with CheckpointManager(run) as mgr:
        assert mgr.restore(make_training_state(seed=1)).step == 1


def test_a_file_changed_on_disk_after_its_write_fails_the_save_before_anything_is_committed(tmp_path, monkeypatch):
    """The writer re-reads its files in staging (in parallel with the other ranks'), before the commit."""
    run = tmp_path / "run"
    state = make_training_state()
    real_write_files = writer.write_files

    def write_then_damage(staging, plans):
        files = real_write_files(staging, plans)
        victim = staging / "state/model.safetensors"
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
        return files

    with CheckpointManager(run) as mgr:
        mgr.save(1, state)
        monkeypatch.setattr(writer, "write_files", write_then_damage)
        with pytest.raises(VerificationError, match=r"model\.safetensors: content hash mismatch.*nothing was"):
            mgr.save(2, state)
        monkeypatch.undo()
    assert sorted(n for n in os.listdir(run) if n.startswith(("checkpoint-", ".staging"))) == ["checkpoint-1"]
    assert publish.read_latest(run) == "checkpoint-1"


def test_an_adapter_that_fails_deep_verification_leaves_nothing_at_the_target(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    _damage_after_rename(monkeypatch, out, "adapter_model.safetensors")
    with pytest.raises(VerificationError, match="deep verification"):
        save_lora_adapters(make_lora_model(), out)
    assert not out.exists(), "a failed save must leave nothing where a user would load it from"
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["adapter.corrupt"]
