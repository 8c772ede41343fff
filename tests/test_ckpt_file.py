"""A checkpoint that is one file (format/ckpt_file.py, commit/file_publish.py): torch.load reads it unchanged,
every byte before the manifest is covered by a record's hash, and crafted archives never pass."""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from ckptguard.catalog import discovery
from ckptguard.catalog.verify import UNVERIFIABLE_FILE, verify_checkpoint
from ckptguard.commit.file_publish import FileCommitter, record_files
from ckptguard.commit.sequence import StagedSave
from ckptguard.format import ckpt_file
from ckptguard.format.manifest import FileEntry, Manifest

STATE = {"global_step": 3, "w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(7)}


def commit(parent: Path, name: str = "last.ckpt", state: dict | None = None) -> Path:
    """A checkpoint file saved as VerifiedCheckpointIO saves one."""
    save = StagedSave.alone(FileCommitter(parent), name, step=3)
    with open(save.path, "wb") as fh:
        torch.save(state or STATE, fh)
    published = save.finish(record_files(save.path, 3), None, sequence=1, level="quick", latest=False)
    return Path(published.where)


def craft(path: Path, records: list[tuple[str, bytes]], listed: dict[str, FileEntry] | None = None) -> Path:
    """An archive of `records` with an embedded manifest listing `listed` (default: every record, hashed)."""
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on a duplicate name, and writes it
        for name, data in records:
            zf.writestr(name, data)
    with open(path, "rb") as fh:
        try:
            entries = ckpt_file.record_entries(fh, ckpt_file.read_archive(fh))
        except ckpt_file.ArchiveError:  # a crafted archive this format refuses: its manifest does not matter
            entries = {}
    manifest = Manifest.new(step=3, sequence=1, files=entries if listed is None else listed)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("archive/ckptguard/MANIFEST.json", manifest.to_json_bytes())
    return path


def test_a_committed_file_loads_with_plain_torch_load_also_mmap_and_weights_only(tmp_path):
    path = commit(tmp_path)
    assert os.listdir(tmp_path) == ["last.ckpt"]
    for kwargs in ({}, {"mmap": True}, {"weights_only": True}, {"mmap": True, "weights_only": True}):
        loaded = torch.load(path, **kwargs)
        assert torch.equal(loaded["w"], STATE["w"]) and loaded["global_step"] == 3
    report = verify_checkpoint(path, "full")
    assert report.ok and report.manifest.step == 3 and report.bytes_read > 4000
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist()[-1] == "archive/ckptguard/MANIFEST.json"


def test_a_flipped_byte_anywhere_before_the_manifest_names_the_record_holding_it(tmp_path):
    path = commit(tmp_path)
    with open(path, "rb") as fh:
        archive = ckpt_file.read_archive(fh)
    clean = path.read_bytes()
    for record in archive.records:
        for offset in (record.start + 14, (record.start + record.end) // 2, record.end - 1):  # header, data, end
            damaged = bytearray(clean)
            damaged[offset] ^= 0x01
            path.write_bytes(damaged)
            report = verify_checkpoint(path, "full")
            assert not report.ok and report.problems[0].file == record.name, (offset, report.reason)
    path.write_bytes(clean)
    assert verify_checkpoint(path, "full").ok


def test_a_flipped_byte_in_the_manifest_record_names_the_manifest(tmp_path):
    path = commit(tmp_path)
    with open(path, "rb") as fh:
        manifest = ckpt_file.read_archive(fh).manifest
    damaged = bytearray(path.read_bytes())
    damaged[manifest.end - 40] ^= 0x01  # inside the manifest's JSON
    path.write_bytes(damaged)
    report = verify_checkpoint(path, "quick")
    assert not report.ok and report.problems[0].file == "archive/ckptguard/MANIFEST.json", report.reason


def test_a_manifest_listing_fewer_records_than_the_archive_holds_is_refused(tmp_path):
    records = [("archive/data.pkl", b"x" * 50), ("archive/data/0", b"y" * 80)]
    good = craft(tmp_path / "good.ckpt", records)
    with open(good, "rb") as fh:
        entries = ckpt_file.record_entries(fh, ckpt_file.read_archive(fh))
    del entries["archive/data/0"]
    report = verify_checkpoint(craft(tmp_path / "fewer.ckpt", records, entries), "quick")
    assert report.problems[0].file == "archive/data/0" and "not in the manifest" in report.problems[0].reason


def test_duplicate_record_names_are_refused(tmp_path):
    path = craft(
        tmp_path / "dup.ckpt", [("archive/data.pkl", b"a"), ("archive/data/0", b"b"), ("archive/data/0", b"c")]
    )
    report = verify_checkpoint(path, "quick")
    assert report.problems[0].file == "archive/data/0" and "appears twice" in report.problems[0].reason


def test_a_record_outside_the_archive_folder_is_refused(tmp_path):
    path = craft(tmp_path / "outside.ckpt", [("archive/data.pkl", b"a"), ("elsewhere/data/0", b"b")])
    report = verify_checkpoint(path, "quick")
    assert report.problems[0].file == "elsewhere/data/0" and "outside the archive's folder" in report.reason


def test_a_manifest_claiming_another_files_hashes_fails_on_them(tmp_path):
    """Same names and sizes (another save of the same model), so only the hashes can tell."""
    theirs = craft(tmp_path / "theirs.ckpt", [("archive/data.pkl", b"p" * 50), ("archive/data/0", b"\x01" * 80)])
    with open(theirs, "rb") as fh:
        their_entries = ckpt_file.record_entries(fh, ckpt_file.read_archive(fh))
    mine = [("archive/data.pkl", b"p" * 50), ("archive/data/0", b"\x00" * 80)]
    forged = craft(tmp_path / "forged.ckpt", mine, their_entries)
    assert verify_checkpoint(forged, "quick").ok, "names and sizes agree"
    report = verify_checkpoint(forged, "full")
    assert report.problems[0].file == "archive/data/0" and "content hash mismatch" in report.reason


def test_a_plain_torch_save_file_is_unverified_and_listed_invalid(tmp_path):
    torch.save(STATE, tmp_path / "plain.ckpt")
    commit(tmp_path)
    report = verify_checkpoint(tmp_path / "plain.ckpt", "full")
    assert report.problems[0].reason == UNVERIFIABLE_FILE and report.manifest is None
    found = {c.name: c for c in discovery.discover(tmp_path)}
    assert found["last.ckpt"].valid and found["last.ckpt"].step == 3
    assert not found["plain.ckpt"].valid and found["plain.ckpt"].reason.endswith(UNVERIFIABLE_FILE)


def test_the_partial_file_never_ends_in_ckpt_and_a_failed_save_leaves_none(tmp_path):
    committer = FileCommitter(tmp_path)
    staging = committer.begin("last.ckpt")
    assert staging.where.name.startswith(".partial-last.ckpt-") and staging.where.suffix != ".ckpt"
    staging.where.write_bytes(b"not a zip archive")
    with pytest.raises(Exception, match="not a checkpoint archive"):
        record_files(staging.where, 3)
    committer.discard(staging)
    assert os.listdir(tmp_path) == []
