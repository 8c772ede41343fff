"""The Hugging Face Trainer integration, with the real transformers Trainer on a tiny Llama on CPU.

Each hazard is shown first on a plain ``Trainer`` (same model, same data, same fault), then shown
gone with ``CheckpointGuardMixin``: a real SIGKILL in the middle of a save, random kills, a bit
flip, and a real full tmpfs.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptguard import verify_checkpoint
from ckptguard.errors import CorruptCheckpointError, UnsupportedStateError, WriteError
from faultkit import Filler, committed_steps, flip_bit, tmpfs
from integrationkit import TORN_STEP, hf_trainer, require, resumed_step
from integrationranks import random_kill_trials

require("hf")
from transformers import TrainerCallback  # noqa: E402 (after the version check)
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

KILL_TRIALS = int(os.environ.get("CKPTGUARD_KILL_TRIALS", "4"))


def test_hook_names_this_integration_overrides_still_exist():
    """transformers has no public checkpoint hook: if these private names change, fail here, loudly."""
    from transformers import Trainer

    for name in ("_save_checkpoint", "_get_output_dir", "_save_optimizer_and_scheduler"):
        assert callable(getattr(Trainer, name, None)), f"transformers.Trainer.{name} is gone: re-pin the hf extra"


def test_plain_trainer_resumes_into_a_checkpoint_torn_by_a_kill(integration_harness, tmp_path):
    """The hazard: a SIGKILL mid-save leaves checkpoint-3 that HF's own resume picks and cannot load."""
    trial = integration_harness.trial(tmp_path, 120.0, saver="hf_plain_torn")
    assert trial.killed and trial.saved == [1, 2]
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / f"checkpoint-{TORN_STEP}")
    with pytest.raises(FileNotFoundError, match=r"trainer_state\.json"):
        hf_trainer(tmp_path, guarded=False, max_steps=5).train(resume_from_checkpoint=True)


def test_same_kill_with_ckptguard_resumes_from_the_newest_verified_checkpoint(integration_harness, tmp_path):
    trial = integration_harness.trial(tmp_path, 120.0, saver="hf_guarded_torn")
    assert trial.killed and trial.saved == [1, 2]
    assert not (tmp_path / f"checkpoint-{TORN_STEP}").exists(), "a torn save must never appear under its name"
    assert any(p.name.startswith(".staging-") for p in tmp_path.iterdir())
    trainer = hf_trainer(tmp_path, max_steps=2)  # resume only: nothing left to train
    assert resumed_step(trainer, True) == 2
    assert not any(p.name.startswith(".staging-") for p in tmp_path.iterdir()), "the killed save's staging is removed"
    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(trainer.resumed_weights[k], v) for k, v in saved.items())


def test_random_kills_then_resume_lands_on_the_newest_verified_checkpoint(integration_harness, tmp_path):
    """Each trial resumes with resume_from_checkpoint=True where the last one was killed at a random instant."""
    killed, resumed = random_kill_trials(integration_harness, tmp_path, "hf_saver", KILL_TRIALS, (1.0, 3.0))
    assert killed == KILL_TRIALS and resumed >= 1


def test_bit_flip_plain_trainer_loads_it_silently_ckptguard_refuses_it(tmp_path):
    plain, guarded = tmp_path / "plain", tmp_path / "guarded"
    for out, is_guarded in ((plain, False), (guarded, True)):
        hf_trainer(out, guarded=is_guarded, max_steps=2).train()
        weights = out / "checkpoint-2" / "model.safetensors"
        flip_bit(weights, -5)  # inside the last tensor's data
    trainer = hf_trainer(plain, guarded=False, max_steps=2)
    assert resumed_step(trainer, True) == 2  # the hazard: flipped weights loaded without a word
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors") as caught:
        hf_trainer(guarded, max_steps=2).train(resume_from_checkpoint=str(guarded / "checkpoint-2"))
    assert caught.value.path == str(guarded / "checkpoint-2")
    assert resumed_step(hf_trainer(guarded, max_steps=2), True) == 1, "auto-resume skips to the previous one"


class FillDiskAfter(TrainerCallback):
    """Leaves `free` bytes on the disk once step `step` is saved, so the next save runs out mid-write."""

    def __init__(self, filler: Filler, step: int, free: int) -> None:
        self.filler, self.step, self.free = filler, step, free

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.filler.leave_bytes(self.free)


def test_full_disk_mid_save_is_a_typed_error_and_older_checkpoints_stay(tmp_path):
    with tmpfs(tmp_path / "disk", size="8m") as disk:
        out = disk / "run"
        trainer = hf_trainer(out, max_steps=4, callbacks=[FillDiskAfter(Filler(disk), 2, 64 << 10)])
        with pytest.raises(WriteError) as caught:
            trainer.train()
        assert caught.value.errno == errno.ENOSPC and caught.value.step == 3
        assert sorted(p.name for p in out.iterdir() if p.name.startswith((".staging", "checkpoint"))) == [
            "checkpoint-1",
            "checkpoint-2",
        ]
        assert committed_steps(out) == [1, 2]
        assert (out / "LATEST").read_text().strip() == "checkpoint-2"


def test_full_disk_in_torch_saves_zip_writer_is_enospc_not_an_opaque_runtime_error(tmp_path):
    """HF writes optimizer.pt with torch.save to a path; its C++ zip writer drops the OSError ("unexpected pos")."""
    with tmpfs(tmp_path / "disk", size="16m") as disk:
        out, filler = disk / "run", Filler(disk)

        class FillBeforeOptimizer(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == 2:
                    filler.leave_room_for_all_but(out / "checkpoint-2", "optimizer.pt")

        with pytest.raises(WriteError, match="unexpected pos") as caught:  # the premise: the zip writer failed
            hf_trainer(out, max_steps=4, callbacks=[FillBeforeOptimizer()]).train()
        assert caught.value.errno == errno.ENOSPC and caught.value.step == 3
        assert "filesystem is full" in caught.value.remedy and "bytes free" in caught.value.message
        assert committed_steps(out) == [1, 2]


def test_full_disk_plain_trainer_leaves_a_checkpoint_its_resume_picks(tmp_path):
    """The hazard on the same disk: the failed save stays as checkpoint-3, the one HF's resume would take."""
    with tmpfs(tmp_path / "disk", size="8m") as disk:
        out = disk / "run"
        trainer = hf_trainer(out, guarded=False, max_steps=4, callbacks=[FillDiskAfter(Filler(disk), 2, 64 << 10)])
        with pytest.raises(Exception, match="No space left on device"):
            trainer.train()
        assert get_last_checkpoint(str(out)) == str(out / "checkpoint-3")
        assert not (out / "checkpoint-3" / "trainer_state.json").exists()


def test_sigterm_jit_checkpoint_is_committed_and_verified(integration_harness, tmp_path):
    """HF's JIT save pre-creates checkpoint-N with a sentinel file; the committed checkpoint replaces it cleanly."""
    trial = integration_harness.trial(tmp_path, 120.0, saver="hf_jit_saver")
    assert trial.error is None and not trial.killed, trial
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("checkpoint-", ".staging", ".trash")))
    assert len(names) == 1 and names[0].startswith("checkpoint-"), names
    checkpoint = tmp_path / names[0]
    assert verify_checkpoint(checkpoint).ok and not (checkpoint / "checkpoint-is-incomplete.txt").exists()
    step = int(names[0].split("-")[1])
    assert step > 2
    assert resumed_step(hf_trainer(tmp_path, max_steps=step), True) == step


BEST_OF_EVERY_STEP = {
    "evaluate": True,
    "max_steps": 5,
    "eval_strategy": "steps",
    "eval_steps": 1,
    "metric_for_best_model": "loss",
    "greater_is_better": True,
    "load_best_model_at_end": True,
}  # fmt: skip  (the loss falls, so "greater is better" makes an early checkpoint the best: an old one)


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint-"))


@pytest.mark.parametrize("limit", [2, 3])
def test_save_total_limit_with_the_best_keeps_what_hf_keeps_and_the_best_names_the_final_directory(tmp_path, limit):
    """HF computes best_model_checkpoint during the save, that is inside staging: it must name the final path."""
    plain = hf_trainer(tmp_path / "plain", guarded=False, save_total_limit=limit, **BEST_OF_EVERY_STEP)
    plain.train()
    trainer = hf_trainer(tmp_path / "run", save_total_limit=limit, **BEST_OF_EVERY_STEP)
    trainer.train()  # load_best_model_at_end loads from best_model_checkpoint: a staging path would fail here
    best = trainer.state.best_model_checkpoint
    assert Path(best).name == Path(plain.state.best_model_checkpoint).name != "checkpoint-5", "premise: an old best"
    assert Path(best).parent == tmp_path / "run" and verify_checkpoint(best).ok
    assert _checkpoints(tmp_path / "run") == _checkpoints(tmp_path / "plain"), "kept other checkpoints than HF"
    assert len(_checkpoints(tmp_path / "run")) == limit
    recorded = json.loads((tmp_path / "run" / "checkpoint-5" / "trainer_state.json").read_text())[
        "best_model_checkpoint"
    ]
    assert recorded == best
    assert trainer.args.save_total_limit == limit, "the caller's arguments changed"
    saved_args = torch.load(tmp_path / "run" / "checkpoint-5" / "training_args.bin", weights_only=False)
    assert saved_args.save_total_limit == limit, "the checkpoint records other arguments than the caller's"


def test_save_total_limit_1_with_the_best_keeps_the_newest_too_and_latest_stays_valid(tmp_path):
    """HF's end-of-training rmtree deleted the newest checkpoint, leaving LATEST naming a missing directory."""
    trainer = hf_trainer(tmp_path, save_total_limit=1, **BEST_OF_EVERY_STEP)
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint).name
    assert best != "checkpoint-5" and _checkpoints(tmp_path) == sorted({best, "checkpoint-5"}), "the best and newest"
    assert (tmp_path / "LATEST").read_text().strip() == "checkpoint-5"
    doctor = subprocess.run(
        [sys.executable, "-m", "ckptguard.cli", "doctor", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr


def test_trainer_before_the_mixin_in_the_bases_is_refused_at_class_creation():
    from transformers import Trainer

    from ckptguard.integrations.hf import CheckpointGuardMixin

    with pytest.raises(TypeError, match=r"write class Backwards\(CheckpointGuardMixin, Trainer\) instead"):

        class Backwards(Trainer, CheckpointGuardMixin):
            pass

    class Guarded(CheckpointGuardMixin, Trainer):
        pass

    class Custom(Guarded):  # a subclass of a guarded Trainer stays guarded
        pass

    assert Custom._save_checkpoint is CheckpointGuardMixin._save_checkpoint


def test_save_on_each_node_is_refused_before_training(tmp_path):
    with pytest.raises(UnsupportedStateError, match="save_on_each_node"):
        hf_trainer(tmp_path, save_on_each_node=True).train()
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
