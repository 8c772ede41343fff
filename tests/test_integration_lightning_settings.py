"""Lightning settings real users have, each either supported through the commit protocol or refused before step 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptguard.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedStateError
from faultkit import flip_bit
from integrationkit import lightning_run, require

require("lightning")

import lightning.pytorch as pl  # noqa: E402

from ckptguard.integrations.lightning import VerifiedCheckpointIO, load_from_checkpoint, own_files  # noqa: E402


def _link_last(run_dir: Path) -> pl.callbacks.ModelCheckpoint:
    return pl.callbacks.ModelCheckpoint(dirpath=run_dir, every_n_train_steps=1, save_last="link")


def test_save_last_link_makes_last_a_link_that_loads_the_verified_file_it_names(tmp_path):
    """A link holds no data: what it names is a committed checkpoint file, verified when loaded through it."""
    run = tmp_path / "link"
    lightning_run(tmp_path / "run", guarded=True, max_steps=2, callbacks=(_link_last(run),))
    assert (run / "last.ckpt").is_symlink() and sorted(os.listdir(run)) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert VerifiedCheckpointIO().load_checkpoint(run / "last.ckpt")["global_step"] == 2
    flip_bit(run / "epoch=0-step=2.ckpt", 2000)
    with pytest.raises(CorruptCheckpointError, match=r"archive/[^:]+: content hash mismatch"):
        VerifiedCheckpointIO().load_checkpoint(run / "last.ckpt")


def test_an_fsspec_url_as_dirpath_is_refused_instead_of_becoming_a_local_folder(tmp_path, monkeypatch):
    """``memory://`` needs no package; ``s3://`` without s3fs is refused by Lightning itself."""
    monkeypatch.chdir(tmp_path)
    url = "memory://bucket/run"
    with pytest.raises(UnsupportedStateError, match="local \\(or mounted\\) directories only") as caught:
        lightning_run(tmp_path / "run", guarded=True, max_steps=2, callbacks=(pl.callbacks.ModelCheckpoint(url),))
    assert caught.value.path == url
    assert not (tmp_path / "memory:").exists(), "the URL became a relative local folder"
    with pytest.raises(UnsupportedStateError):  # trainer.save_checkpoint to a URL goes the same way
        VerifiedCheckpointIO().save_checkpoint({"global_step": 1}, f"{url}/x.ckpt")
    assert not (tmp_path / "memory:").exists()


def test_load_from_checkpoint_on_a_checkpoint_file_verifies_then_loads_the_module(tmp_path):
    """Lightning's own ``cls.load_from_checkpoint`` and ours; a plain file still loads the plain way."""
    run = tmp_path / "run"
    trainer = lightning_run(run, guarded=True, max_steps=2)
    module_cls = type(trainer.lightning_module)
    want = trainer.lightning_module.state_dict()
    for loaded in (
        module_cls.load_from_checkpoint(run / "last.ckpt", map_location="cpu"),
        load_from_checkpoint(module_cls, run / "last.ckpt", map_location="cpu"),
    ):
        got = loaded.state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(CheckpointNotFoundError):
        load_from_checkpoint(module_cls, run / "lats.ckpt")
    torch.save(torch.load(run / "last.ckpt", weights_only=False), tmp_path / "plain.ckpt")  # the user's own
    assert module_cls.load_from_checkpoint(tmp_path / "plain.ckpt").state_dict().keys() == want.keys()
    with pytest.raises(CorruptCheckpointError, match="a file saved without ckptguard"):  # ours refuses it
        load_from_checkpoint(module_cls, tmp_path / "plain.ckpt")
    flip_bit(run / "last.ckpt", 2000)
    for load in (module_cls.load_from_checkpoint, lambda path: load_from_checkpoint(module_cls, path)):
        with pytest.raises(CorruptCheckpointError, match=r"archive/[^:]+: content hash mismatch"):
            load(run / "last.ckpt")


def test_ls_and_doctor_on_a_model_checkpoint_directory_show_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    lightning_run(run, guarded=True, max_steps=3)
    cli = [sys.executable, "-m", "ckptguard.cli"]
    listed = subprocess.run([*cli, "ls", str(run)], capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    rows = [line.lstrip("* ").split()[:3] for line in listed.stdout.splitlines()]
    assert ["epoch=0-step=2.ckpt", "2", "valid"] in rows and ["epoch=0-step=3.ckpt", "3", "valid"] in rows, rows
    assert sorted(os.listdir(run)) == ["epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt", "last.ckpt"], "only Lightning's"
    assert (own_files(run) / "events.jsonl").is_file()
    doctor = subprocess.run([*cli, "doctor", str(run)], capture_output=True, text=True, timeout=300)
    assert doctor.returncode == 0 and "3 valid, 0 invalid" in doctor.stdout, doctor.stdout + doctor.stderr


def test_a_copy_of_the_guard_taken_mid_fit_does_not_release_the_fits_run_lock(tmp_path):
    """``deepcopy(trainer.callbacks)`` mid-fit, then the copy torn down: the fit still holds its directory."""
    import copy

    from ckptguard.integrations.lightning import LightningGuard
    from faultkit import construct_in_child

    run = tmp_path / "run"
    seen: list[dict] = []

    class CopyAndTearDown(pl.Callback):
        def on_train_batch_end(self, trainer, *_):
            if trainer.global_step == 1:
                guard = next(c for c in trainer.callbacks if isinstance(c, LightningGuard))
                copy.deepcopy(guard).teardown(trainer, trainer.lightning_module, "fit")
                seen.append(construct_in_child(own_files(run)))  # where the fit's run lock is

    lightning_run(run, guarded=True, max_steps=2, callbacks=(CopyAndTearDown(),))
    assert seen[0]["ok"] is False and seen[0]["type"] == "LockedError", seen
