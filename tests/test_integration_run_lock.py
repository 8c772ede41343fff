"""Every integration holds its run directory as CheckpointManager does: locked for one writer, probed before step 1.

Without it, a second job started on the same output directory removed the live writer's staging
directory as a "leftover" and then wrote its own checkpoints beside it, and a read-only output
directory was found only at the first save, after training steps had been spent.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from ckptguard.commit import publish
from ckptguard.errors import LockedError, NotWritableError
from ckptguard.format.layout import checkpoint_name
from faultkit import construct_in_child, manager_in_child, remount_read_only, tmpfs
from integrationkit import TokenData, hf_trainer, lightning_run, require, tiny_llama

LIBRARIES = ["hf", "accelerate-load", "accelerate-save", "lightning"]


def _train(library: str, run_dir: Path, steps: list[int]) -> None:
    """Start a run the way README shows for `library`; `steps` gets every training step that ran."""
    require(library.split("-")[0])
    if library == "lightning":
        import lightning.pytorch as pl

        class LightningSteps(pl.Callback):
            def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
                steps.append(trainer.global_step)

        lightning_run(run_dir, guarded=True, max_steps=2, callbacks=(LightningSteps(),))
        return
    if library == "hf":
        from transformers import TrainerCallback

        class Steps(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                steps.append(state.global_step)

        hf_trainer(run_dir, callbacks=[Steps()], max_steps=2).train()
        return
    import torch
    from accelerate import Accelerator

    from ckptguard.integrations import accelerate as guard

    acc = Accelerator(cpu=True)
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    if library == "accelerate-load":
        guard.load_state(acc, run_dir, missing_ok=True)
    for step in (1, 2):
        acc.backward(model(**TokenData()[0:4]).loss)
        opt.step()
        steps.append(step)
        guard.save_state(acc, run_dir, step)


def _live_staging(run_dir: Path) -> Path:
    """A save in flight, as the writer holding the lock has it: a staging directory with a file in it."""
    staging = publish.create_staging(run_dir, checkpoint_name(7))
    (staging / "model.safetensors").write_bytes(b"x" * 4096)
    return staging


@pytest.mark.parametrize("library", LIBRARIES)
def test_a_second_job_on_a_held_run_directory_gets_locked_error_and_the_live_save_stays(tmp_path, library):
    run = tmp_path / "run"
    run.mkdir()
    with manager_in_child(run):  # a real second process holds the run directory
        live = _live_staging(run)
        steps: list[int] = []
        with pytest.raises(LockedError, match="another process holds the run directory lock"):
            _train(library, run, steps)
        assert live.is_dir() and (live / "model.safetensors").stat().st_size == 4096
    expected = [] if library != "accelerate-save" else [1]  # Accelerate without load_state: at its first save
    assert steps == expected
    assert not any(p.name.startswith("checkpoint-") or p.name.endswith(".ckpt") for p in run.iterdir())


@pytest.mark.parametrize("library", ["hf", "accelerate-load", "lightning"])
def test_a_read_only_output_directory_fails_before_the_first_step(tmp_path, library):
    with tmpfs(tmp_path / "disk") as disk:
        run = disk / "run"
        run.mkdir()
        remount_read_only(disk)
        steps: list[int] = []
        with pytest.raises(NotWritableError) as info:
            _train(library, run, steps)
        assert info.value.errno == errno.EROFS
        assert str(run) in str(info.value.path)
        assert steps == []


def test_the_hf_trainer_holds_the_lock_while_it_trains_and_releases_it_after(tmp_path):
    require("hf")
    from transformers import TrainerCallback

    run = tmp_path / "run"
    seen: list[dict[str, Any]] = []

    class SecondJob(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 1:
                seen.append(construct_in_child(run))

    hf_trainer(run, callbacks=[SecondJob()], max_steps=2).train()
    assert seen[0]["ok"] is False and seen[0]["type"] == "LockedError", seen
    assert construct_in_child(run) == {"ok": True}  # released once train() returned


def test_lightning_holds_the_lock_while_it_fits_and_releases_it_after_a_failed_fit_too(tmp_path):
    require("lightning")
    import lightning.pytorch as pl

    run = tmp_path / "run"
    seen: list[dict[str, Any]] = []

    class SecondJob(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            if trainer.global_step == 1:
                seen.append(construct_in_child(run))
                raise RuntimeError("stop here")  # Lightning ends fit on it without a teardown hook

    with pytest.raises(RuntimeError, match="stop here"):
        lightning_run(run, guarded=True, max_steps=3, callbacks=(SecondJob(),))
    assert seen[0]["ok"] is False and seen[0]["type"] == "LockedError", seen
    assert construct_in_child(run) == {"ok": True}  # released although fit ended in an exception


def test_leftovers_of_a_killed_save_are_removed_at_the_start_under_the_lock(tmp_path):
    require("hf")
    run = tmp_path / "run"
    run.mkdir()
    leftover = _live_staging(run)  # no process holds the directory: this save's writer is dead
    hf_trainer(run, max_steps=1).train()
    assert not leftover.exists()
    assert (run / checkpoint_name(1)).is_dir()
