"""Fail fast: an output directory that cannot hold the run's checkpoints stops training before step 1.

Real faults: a read-only tmpfs, a tmpfs too small for the estimated checkpoints, a path that is a file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptguard.cli.main import main
from faultkit import remount_read_only, tmpfs

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "data.seq_len=32", "train.batch_size=2",
        "train.max_steps=3", "train.progress_bar=false"]  # fmt: skip


def train(out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = [a for v in [*TINY, f"checkpoint.output_dir={out}"] for a in ("--set", v)]
    code = main(["train", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_read_only_mount_stops_before_step_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tmpfs(tmp_path / "mnt", size="4m") as mnt:
        remount_read_only(mnt)
        code, out, err = train(mnt / "run", capsys)
    assert code == 1
    assert "error: NotWritableError: cannot create the run directory: Read-only file system" in err
    assert f"path={mnt / 'run'}" in err
    assert "Remedy: The filesystem is mounted read-only: remount it read-write or choose another path." in err
    assert "step 1/" not in out


def test_full_tmpfs_stops_before_step_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 64 KiB holds no checkpoint of even the tiniest run: adapter + two AdamW moments per save.
    with tmpfs(tmp_path / "mnt", size="64k") as mnt:
        code, out, err = train(mnt, capsys)
        left = sorted(p.name for p in mnt.iterdir())
    assert code == 1
    assert "error: InsufficientSpaceError:" in err and "retained checkpoint(s) plus one in flight needs" in err
    assert f"path={mnt}" in err and "errno=ENOSPC" in err
    assert "Remedy: Free space, lower keep_last, or choose an output directory on a larger filesystem." in err
    assert "step 1/" not in out
    assert not [name for name in left if name.startswith("checkpoint-")]


def test_output_dir_that_is_a_file_stops_before_step_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").write_text("not a directory")
    code, out, err = train(tmp_path / "taken", capsys)
    assert code == 1
    assert "error: NotWritableError:" in err and str(tmp_path / "taken") in err
    assert "step 1/" not in out
