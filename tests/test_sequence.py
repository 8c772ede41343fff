"""The one staged save (commit/sequence.py): every way out of it leaves a committed checkpoint or nothing.

On a real directory: a write that fails, a hook that raises something untyped, a library that leaves a
link among its files; and the one metrics rule every saver shares.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from ckptguard import verify_checkpoint
from ckptguard.commit.publish import DirCommitter
from ckptguard.commit.sequence import StagedSave
from ckptguard.errors import WriteError
from ckptguard.files.writer import FilePlan
from ckptguard.format.layout import STAGING_PREFIX
from ckptguard.format.manifest import read_manifest


def _plans() -> list[FilePlan]:
    return [FilePlan("state/model.safetensors", tensors={"w": torch.arange(6.0)}), FilePlan("a.json", data=b"{}")]


def _committed(parent: Path) -> None:
    save = StagedSave.alone(DirCommitter(parent), "checkpoint-1", step=1)
    files, error = save.write(_plans())
    save.finish(files, error, sequence=1, level="full")


def _left(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_a_write_that_fails_is_a_write_error_and_leaves_nothing_but_the_earlier_checkpoint(tmp_path: Path) -> None:
    _committed(tmp_path)
    save = StagedSave.alone(DirCommitter(tmp_path), "checkpoint-2", step=2)
    (save.path / "a.json").mkdir()  # the file's name is taken by a directory: its open fails with EISDIR
    files, error = save.write(_plans())
    assert files == {} and isinstance(error, WriteError) and error.step == 2
    with pytest.raises(WriteError, match="could not write checkpoint file"):
        save.finish(files, error, sequence=2, level="full")
    assert _left(tmp_path) == ["LATEST", "checkpoint-1"]  # no staging left, no checkpoint-2
    assert verify_checkpoint(tmp_path / "checkpoint-1", "full").ok


def test_an_untyped_error_from_a_hook_discards_staging_and_propagates(tmp_path: Path) -> None:
    save = StagedSave.alone(DirCommitter(tmp_path), "checkpoint-1", step=1)
    files, error = save.write(_plans())

    def broken() -> None:
        raise RuntimeError("a hook's own bug")

    with pytest.raises(RuntimeError, match="a hook's own bug"):
        save.finish(files, error, sequence=1, level="full", before_publish=broken)
    assert _left(tmp_path) == []


def test_a_link_among_a_librarys_files_fails_the_save_naming_it(tmp_path: Path) -> None:
    """A library's files are adopted as they are found: a symlink could point anywhere, so it is refused."""
    save = StagedSave.alone(DirCommitter(tmp_path), "checkpoint-1", step=1)
    (save.path / "weights.bin").write_bytes(os.urandom(64))
    os.symlink("/etc/hostname", save.path / "config.json")
    with pytest.raises(WriteError, match=r"config\.json"):
        save.finish(None, None, sequence=1, level="full")
    assert not any(p.name.startswith(STAGING_PREFIX) for p in tmp_path.iterdir())
    assert not (tmp_path / "checkpoint-1").exists()


def test_non_finite_metrics_are_kept_by_every_saver(tmp_path: Path) -> None:
    """One rule (Manifest.new): a diverged loss is evidence, kept as "nan"; the integrations used to drop it."""
    save = StagedSave.alone(DirCommitter(tmp_path), "checkpoint-1", step=1)
    files, error = save.write(_plans())
    published = save.finish(
        files, error, sequence=1, level="full", metrics={"loss": float("nan"), "lr": 1e-4, "grad": float("inf")}
    )
    metrics = read_manifest(Path(published.where)).metrics
    assert math.isnan(metrics["loss"]) and metrics["grad"] == math.inf and metrics["lr"] == 1e-4
