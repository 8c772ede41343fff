"""FSDP2 state through the commit protocol: two real gloo ranks on CPU (see shardranks.py).

Sharded checkpoints must hold the same promises as replicated ones: every shard file in the
manifest with its hash and writer, exact resume, resharding between world sizes, and every fault
(a rank killed mid-write, a full disk, a flipped bit, the whole job killed mid-save) ending in a
typed error on every rank or the previous checkpoint, never a hang or a half-written one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ckptguard import verify_checkpoint
from ckptguard.files.hashing import hash_file
from ckptguard.format.manifest import read_manifest
from faultkit import flip_bit, tmpfs
from shardranks import TIMEOUT_S, kill_job_mid_save, resumed, run_ranks


@pytest.fixture
def trained(fsdp_trained: tuple[Path, dict[str, str]]) -> tuple[Path, dict[str, str]]:
    return fsdp_trained


def test_manifest_lists_every_shard_file_with_its_hash_and_writer(trained: tuple[Path, dict[str, str]]) -> None:
    checkpoint = trained[0] / "checkpoint-2"
    files = read_manifest(checkpoint).files
    shards = {relpath: entry for relpath, entry in files.items() if relpath.startswith("sharded/")}
    assert {e.rank for p, e in shards.items() if p.endswith(".distcp")} == {0, 1}
    assert shards["sharded/.metadata"].rank == 0
    for relpath, entry in shards.items():
        assert hash_file(checkpoint / relpath) == (entry.size, entry.xxh3_128)
    assert verify_checkpoint(checkpoint, "full").ok


def test_resume_on_two_ranks_is_bitwise_exact(trained: tuple[Path, dict[str, str]]) -> None:
    run_dir, trace = trained
    report = resumed(run_dir)
    assert (report["step"], report["restored"], report["next"]) == (2, trace["2"], trace["3"])


def test_two_rank_checkpoint_restores_on_one_rank(trained: tuple[Path, dict[str, str]]) -> None:
    run_dir, trace = trained
    report = resumed(run_dir, world=1)
    assert (report["step"], report["restored"]) == (2, trace["2"])


def test_one_rank_checkpoint_restores_on_two_ranks(tmp_path: Path) -> None:
    (saved,) = run_ranks("train", tmp_path / "run", world=1)
    assert saved["ok"], saved
    report = resumed(tmp_path / "run")
    assert (report["step"], report["restored"]) == (2, saved["trace"]["2"])


def test_background_save_holds_the_shards_of_its_step_while_training_goes_on(tmp_path: Path) -> None:
    reports = run_ranks("train", tmp_path / "run", arg="async")
    assert all(r["ok"] for r in reports), reports
    report = resumed(tmp_path / "run")
    assert (report["step"], report["restored"], report["next"]) == (
        2,
        reports[0]["trace"]["2"],
        reports[0]["trace"]["3"],
    )


def test_flipped_bit_in_one_shard_file_is_named_and_resume_takes_the_previous(
    trained: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    run_dir, trace = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    flip_bit(copy / "checkpoint-2" / "sharded" / "__1_0.distcp", 200)
    report = verify_checkpoint(copy / "checkpoint-2", "full")
    assert not report.ok and "sharded/__1_0.distcp" in report.reason
    report = resumed(copy)
    assert (report["step"], report["restored"], report["next"]) == (1, trace["1"], trace["2"])


def test_shard_changed_on_disk_after_its_write_fails_the_save_on_every_rank_naming_its_writer(tmp_path: Path) -> None:
    """Each rank re-reads its own shards before the ranks agree: rank 1's bad file is rank 1's error, everywhere.

    Nothing is committed (no ``checkpoint-2``, not even moved aside) and checkpoint-1 stays LATEST.
    """
    reports = run_ranks("train", tmp_path / "run", arg="flip1")
    assert [(r["type"], r["rank"]) for r in reports] == [("VerificationError", 1)] * 2, reports
    assert reports[0]["text"] == reports[1]["text"]
    assert "sharded/__1_0.distcp: content hash mismatch" in reports[0]["text"]
    assert "nothing was committed" in reports[0]["text"] and "step=2" in reports[0]["text"]
    _assert_only_checkpoint_1(tmp_path / "run")


def test_metadata_restore_would_refuse_fails_the_save_on_every_rank_before_the_commit(tmp_path: Path) -> None:
    """Rank 0 decodes DCP's ``.metadata`` as restore will, from the bytes it read back while they were fsynced,
    before the ranks agree: a record the decoder does not know fails the save everywhere, names the file,
    and nothing is committed or even moved aside; checkpoint-1 stays LATEST and restores."""
    reports = run_ranks("train", tmp_path / "run", arg="refuse")
    assert [(r["type"], r["rank"]) for r in reports] == [("VerificationError", 0)] * 2, reports
    assert reports[0]["text"] == reports[1]["text"]
    assert "sharded/.metadata" in reports[0]["text"] and "StorageMeta" in reports[0]["text"], reports[0]
    assert "nothing was committed" in reports[0]["text"] and "step=2" in reports[0]["text"]
    _assert_only_checkpoint_1(tmp_path / "run")
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".corrupt")]
    assert resumed(tmp_path / "run")["step"] == 1


def test_rank_killed_while_writing_its_shard_is_named_on_the_other(tmp_path: Path) -> None:
    survivor, killed = run_ranks("train", tmp_path / "run", arg="kill1")
    assert killed.get("exit") == -9, killed
    assert survivor["type"] == "CoordinationError" and survivor["rank"] == 1, survivor
    assert "rank 1 never finished writing its shard files" in survivor["text"]
    assert survivor["seconds"] < TIMEOUT_S + 5
    _assert_only_checkpoint_1(tmp_path / "run")


def test_full_disk_during_the_shard_write_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="2m") as disk:
        reports = run_ranks("train", disk / "run", arg="fill", arg2=str(disk))
        assert [r["type"] for r in reports] == ["WriteError", "WriteError"], reports
        assert reports[0]["text"] == reports[1]["text"] and reports[0]["errno"] == 28
        assert "No space left on device" in reports[0]["text"] and "rank=" in reports[0]["text"]
        _assert_only_checkpoint_1(disk / "run")


def test_whole_job_killed_mid_save_resumes_exactly_from_the_last_commit(
    trained: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    trace = trained[1]
    killed_at = kill_job_mid_save(tmp_path / "run", range(2, 5))
    report = resumed(tmp_path / "run")
    assert report["step"] == killed_at - 1
    assert (report["restored"], report["next"]) == (trace[str(killed_at - 1)], trace[str(killed_at)])
    assert not list((tmp_path / "run").glob(".staging-*"))  # the half-written save was cleared at startup


def _assert_only_checkpoint_1(run_dir: Path) -> None:
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(("checkpoint-", ".staging"))) == [
        "checkpoint-1"
    ]
    assert (run_dir / "LATEST").read_text().strip() == "checkpoint-1"
    assert verify_checkpoint(run_dir / "checkpoint-1", "full").ok
