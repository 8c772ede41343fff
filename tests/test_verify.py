"""verify.py + resume on damaged checkpoints: every kind of damage is named, and resume falls back."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from ckptguard import CheckpointManager, CorruptCheckpointError, verify_checkpoint
from ckptguard.format.manifest import _checksum
from conftest import make_training_state
from faultkit import flip_bit, python_cmd

STATE_FILE = "state/model.safetensors"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run with two committed checkpoints (steps 10 and 20) whose model weights differ."""
    state = make_training_state()
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(10, state)
        with torch.no_grad():
            state["model"][0].weight.add_(1.0)
        mgr.save(20, state)
    return tmp_path / "run"


def rewrite_manifest(ckpt: Path, edit) -> None:
    """A hostile edit that keeps the manifest's own checksum consistent."""
    body = json.loads((ckpt / "MANIFEST.json").read_text())
    edit(body)
    body["checksum"] = _checksum(body)
    (ckpt / "MANIFEST.json").write_text(json.dumps(body))


def damage_cases():
    def flip(ck):
        flip_bit(ck / STATE_FILE, os.path.getsize(ck / STATE_FILE) - 3)

    def truncate(ck):
        with open(ck / STATE_FILE, "r+b") as fh:
            fh.truncate(os.path.getsize(ck / STATE_FILE) - 7)

    def delete(ck):
        (ck / STATE_FILE).unlink()

    def extra(ck):
        (ck / "state" / "stray.bin").write_bytes(b"x")

    def wrong_hash(ck):
        rewrite_manifest(ck, lambda b: b["files"][STATE_FILE].update(xxh3_128="0" * 32))

    def dotdot(ck):
        rewrite_manifest(ck, lambda b: b["files"].update({"../escape": b["files"].pop(STATE_FILE)}))

    def absolute(ck):
        rewrite_manifest(ck, lambda b: b["files"].update({"/etc/passwd": b["files"].pop(STATE_FILE)}))

    def invalid_json(ck):
        (ck / "MANIFEST.json").write_text('{"format": "ckptguard-checkpoint", ')

    def edited_manifest(ck):
        body = json.loads((ck / "MANIFEST.json").read_text())
        body["step"] = 999
        (ck / "MANIFEST.json").write_text(json.dumps(body))

    def symlink(ck):
        (ck / STATE_FILE).unlink()
        (ck / STATE_FILE).symlink_to("/etc/hostname")

    return [
        ("bit flip", flip, STATE_FILE, "content hash mismatch"),
        ("truncated", truncate, STATE_FILE, "truncated"),
        ("deleted", delete, STATE_FILE, "missing"),
        ("extra file", extra, "state/stray.bin", "unexpected file"),
        ("wrong hash in manifest", wrong_hash, STATE_FILE, "content hash mismatch"),
        ("dotdot path", dotdot, "MANIFEST.json", "climbs out"),
        ("absolute path", absolute, "MANIFEST.json", "is absolute"),
        ("invalid json", invalid_json, "MANIFEST.json", "not valid JSON"),
        ("edited manifest", edited_manifest, "MANIFEST.json", "checksum does not match"),
        ("symlink", symlink, STATE_FILE, "symbolic link"),
    ]


@pytest.mark.parametrize(("label", "damage", "file", "reason"), damage_cases(), ids=[c[0] for c in damage_cases()])
def test_damage_is_named_by_verify_and_resume_falls_back(run, label, damage, file, reason):
    damage(run / "checkpoint-20")
    report = verify_checkpoint(run / "checkpoint-20", "full")
    assert not report.ok
    assert report.problems[0].file == file, report.problems
    assert reason in report.problems[0].reason, report.problems

    fresh = make_training_state(seed=1)
    with CheckpointManager(run) as mgr:
        restored = mgr.restore(fresh)
    assert restored is not None and restored.step == 10, f"{label}: resume must skip to checkpoint-10"
    expected = make_training_state()["model"][0].weight  # checkpoint-10 holds the un-incremented weight
    assert torch.equal(fresh["model"][0].weight, expected)


def test_bit_flip_passes_quick_but_fails_full(run):
    flip_bit(run / "checkpoint-20" / STATE_FILE, 200)
    assert verify_checkpoint(run / "checkpoint-20", "quick").ok
    assert not verify_checkpoint(run / "checkpoint-20", "full").ok


def rehash(ckpt: Path, relpath: str) -> None:
    """Make the manifest agree with a file's current bytes: damage that every hash check passes."""
    import xxhash

    data = (ckpt / relpath).read_bytes()
    digest = xxhash.xxh3_128_hexdigest(data)
    rewrite_manifest(ckpt, lambda b: b["files"][relpath].update(size=len(data), xxh3_128=digest))


def test_deep_parses_every_tensor_file_and_catches_a_header_that_passes_every_hash(run):
    ckpt = run / "checkpoint-20"
    data = bytearray((ckpt / STATE_FILE).read_bytes())
    data[8:9] = b"!"  # first byte of the JSON header: the file no longer parses as safetensors
    (ckpt / STATE_FILE).write_bytes(bytes(data))
    rehash(ckpt, STATE_FILE)
    assert verify_checkpoint(ckpt, "full").ok, "the hashes agree: only parsing can tell"
    report = verify_checkpoint(ckpt, "deep")
    assert not report.ok and report.problems[0].file == STATE_FILE, report.problems
    assert "not a valid safetensors file" in report.reason


def test_bytes_read_counts_what_was_read_not_what_the_manifest_lists(run):
    ckpt = run / "checkpoint-20"
    assert verify_checkpoint(ckpt, "quick").bytes_read == 0, "quick only stats"
    full = verify_checkpoint(ckpt, "full")
    assert full.ok and full.bytes_read == full.manifest.total_bytes
    # one file that cannot be opened (a real EACCES: root without CAP_DAC_OVERRIDE, mode 000)
    os.chmod(ckpt / STATE_FILE, 0)
    code = "import json, sys; from ckptguard import verify_checkpoint; r = verify_checkpoint(sys.argv[1], 'full'); "
    code += "print(json.dumps([r.bytes_read, r.reason]))"
    out = subprocess.run(python_cmd(code, str(ckpt), unprivileged=True), capture_output=True, text=True, timeout=120)
    bytes_read, reason = json.loads(out.stdout.strip().splitlines()[-1])
    assert reason == f"{STATE_FILE}: cannot be read (Permission denied)"
    assert bytes_read == full.bytes_read - full.manifest.files[STATE_FILE].size


def test_a_trainer_state_whose_step_disagrees_with_the_manifest_is_invalid_and_skipped(run):
    ckpt = run / "checkpoint-20"
    doc_path = ckpt / "state" / "trainer_state.json"
    doc = json.loads(doc_path.read_text())
    doc["step"] = 7
    doc_path.write_text(json.dumps(doc))
    rehash(ckpt, "state/trainer_state.json")
    assert verify_checkpoint(ckpt, "quick").ok
    report = verify_checkpoint(ckpt, "full")
    assert not report.ok and "records step 7, but the manifest says step 20" in report.reason
    fresh = make_training_state(seed=1)
    with CheckpointManager(run) as mgr:
        restored = mgr.restore(fresh)
    assert restored is not None and restored.step == 10, "resume must skip the inconsistent checkpoint"


def test_explicit_restore_of_damaged_checkpoint_raises_and_leaves_state_untouched(run):
    flip_bit(run / "checkpoint-20" / "state/optimizer.safetensors", 300)
    fresh = make_training_state(seed=1)
    before = {k: v.clone() for k, v in fresh["model"].state_dict().items()}
    with CheckpointManager(run) as mgr, pytest.raises(CorruptCheckpointError, match=r"optimizer\.safetensors"):
        mgr.restore(fresh, step=20)
    for k, v in fresh["model"].state_dict().items():
        assert torch.equal(v, before[k]), "a failed restore must not half-load the model"


def test_manifest_from_a_newer_format_asks_for_an_upgrade(run):
    rewrite_manifest(run / "checkpoint-20", lambda b: b.update(format_version=2))
    report = verify_checkpoint(run / "checkpoint-20", "quick")
    assert "upgrade ckptguard" in report.reason


def test_unknown_level_is_rejected():
    with pytest.raises(ValueError, match="quick, full, deep"):
        verify_checkpoint(".", "paranoid")
