"""The Accelerate integration, with the real Accelerator on a tiny Llama on CPU.

Each hazard is shown first with Accelerate's own ``save_state``/``load_state`` (same model, same
data, same fault), then shown gone with ckptguard's companions.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors.torch import load_file

from ckptguard.errors import CorruptCheckpointError, WriteError
from faultkit import Filler, committed_steps, flip_bit, tmpfs
from integrationkit import TORN_STEP, accelerate_run
from integrationranks import random_kill_trials

pytest.importorskip("accelerate")

from ckptguard.integrations.accelerate import load_state

KILL_TRIALS = int(os.environ.get("CKPTGUARD_KILL_TRIALS", "8"))


def _weights(acc) -> dict[str, torch.Tensor]:
    return acc.unwrap_model(acc._models[0]).state_dict()


def test_plain_accelerate_deletes_before_saving_and_resumes_into_an_empty_checkpoint(integration_harness, tmp_path):
    """The hazard: automatic naming deletes the oldest checkpoint first; a kill leaves an empty newest one."""
    trial = integration_harness.trial(tmp_path, 120.0, saver="accelerate_plain_torn")
    assert trial.killed and trial.saved == [1, 2]
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_1", "checkpoint_2"]  # _0 already deleted
    assert not any((checkpoints / "checkpoint_2").iterdir())
    with pytest.raises(FileNotFoundError, match="checkpoint_2"):
        accelerate_run(tmp_path, guarded=False, max_steps=0)  # load_state() picks the empty checkpoint_2


def test_same_kill_with_ckptguard_resumes_the_newest_verified_checkpoint_and_its_counter(integration_harness, tmp_path):
    trial = integration_harness.trial(tmp_path, 120.0, saver="accelerate_guarded_torn")
    assert trial.killed and trial.saved == [1, 2]
    assert not (tmp_path / f"checkpoint_{TORN_STEP - 1}").exists()
    assert committed_steps(tmp_path) == [1, 2], "total_limit=2 deleted nothing before the new one committed"
    acc = accelerate_run(tmp_path, guarded=True, max_steps=0)
    assert acc.save_iteration == 2, "Accelerate's save counter continues after the loaded checkpoint"
    assert not any(p.name.startswith(".staging-") for p in tmp_path.iterdir())
    saved = load_file(tmp_path / "checkpoint_1" / "model.safetensors")
    live = _weights(acc)
    assert all(torch.equal(live[k], v) for k, v in saved.items())


def test_random_kills_then_load_state_lands_on_the_newest_verified_checkpoint(integration_harness, tmp_path):
    killed, resumed = random_kill_trials(integration_harness, tmp_path, "accelerate_saver", KILL_TRIALS, (0.2, 0.9))
    assert killed == KILL_TRIALS and resumed >= 1


def test_bit_flip_plain_load_state_takes_it_ckptguard_refuses_it(tmp_path):
    plain, guarded = tmp_path / "plain", tmp_path / "guarded"
    accelerate_run(plain, guarded=False, max_steps=2)
    accelerate_run(guarded, guarded=True, max_steps=2)
    flip_bit(plain / "checkpoints" / "checkpoint_1" / "model.safetensors", -5)
    flip_bit(guarded / "checkpoint_1" / "model.safetensors", -5)
    acc = accelerate_run(plain, guarded=False, max_steps=0)  # the hazard: loads the flipped weights silently
    assert acc.save_iteration == 0, "and Accelerate's own load_state does not restore its save counter"
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors") as caught:
        load_state(acc, guarded, guarded / "checkpoint_1")
    assert caught.value.path == str(guarded / "checkpoint_1")
    assert load_state(acc, guarded) == guarded / "checkpoint_0", "auto-resume skips to the previous one"


def test_load_state_on_a_missing_run_dir_raises_unless_missing_ok(tmp_path):
    from accelerate import Accelerator

    from ckptguard.errors import CheckpointNotFoundError

    acc, typo = Accelerator(cpu=True), tmp_path / "runs" / "exp1-typo"
    with pytest.raises(CheckpointNotFoundError, match="the run directory to resume from does not exist") as caught:
        load_state(acc, typo)
    assert caught.value.path == str(typo) and "missing_ok=True" in caught.value.remedy
    assert load_state(acc, typo, missing_ok=True) is None, "a first start, asked for"


def test_full_disk_mid_save_is_a_typed_error_and_older_checkpoints_stay(tmp_path):
    with tmpfs(tmp_path / "disk", size="8m") as disk:
        out, filler = disk / "run", Filler(disk)
        with pytest.raises(WriteError) as caught:
            accelerate_run(out, guarded=True, max_steps=4, after_save=lambda s: s == 2 and filler.leave_bytes(64 << 10))
        assert caught.value.errno == errno.ENOSPC and caught.value.step == 3
        assert committed_steps(out) == [1, 2]
        assert not [p.name for p in out.iterdir() if p.name.startswith(".staging")]
        assert (out / "LATEST").read_text().strip() == "checkpoint_1"


def test_full_disk_in_torch_saves_zip_writer_is_enospc_not_an_opaque_runtime_error(tmp_path):
    """Accelerate writes optimizer.bin with torch.save to a path; its C++ zip writer drops the OSError."""
    with tmpfs(tmp_path / "disk", size="16m") as disk:
        out, filler = disk / "run", Filler(disk)

        def fill(step: int) -> None:
            if step == 2:
                filler.leave_room_for_all_but(out / "checkpoint_1", "optimizer.bin")

        with pytest.raises(WriteError, match="unexpected pos") as caught:  # the premise: the zip writer failed
            accelerate_run(out, guarded=True, max_steps=4, after_save=fill)
        assert caught.value.errno == errno.ENOSPC and caught.value.step == 3
        assert "filesystem is full" in caught.value.remedy and "bytes free" in caught.value.message
        assert committed_steps(out) == [1, 2]


def test_a_zip_writer_error_on_a_disk_with_room_is_not_blamed_on_space(tmp_path):
    from ckptguard.integrations.staged import write_error

    zip_writer = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    error = write_error(zip_writer, tmp_path, 3)
    assert error.errno is None and "unexpected pos" in error.message and "bytes free" not in error.message


def test_project_config_total_limit_with_automatic_naming_rotates_after_each_commit(tmp_path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from ckptguard.integrations.accelerate import save_state

    config = ProjectConfiguration(project_dir=str(tmp_path), automatic_checkpoint_naming=True, total_limit=2)
    acc = Accelerator(cpu=True, project_config=config)
    model = acc.prepare(torch.nn.Linear(4, 4))
    for _ in range(4):
        with torch.no_grad():
            model.weight.add_(1.0)
        save_state(acc, tmp_path / "run")  # step: Accelerate's save counter, 0 to 3
    assert committed_steps(tmp_path / "run") == [2, 3]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint*")) == ["checkpoint_2", "checkpoint_3"]
    assert (tmp_path / "run" / "LATEST").read_text().strip() == "checkpoint_3"
    assert not (tmp_path / "checkpoints").exists(), "Accelerate's own naming wrote beside ours"


def test_only_the_names_accelerate_writes_are_checkpoints_and_resume_follows_save_order(tmp_path):
    """checkpoint_007 / checkpoint_-1 / checkpoint_1e3 are nobody's; checkpoint-3 and checkpoint_3 side by side are
    two checkpoints, and load_state takes the one saved last, not the higher number."""
    import shutil

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from ckptguard.catalog.discovery import discover
    from ckptguard.format.layout import iteration_from_name
    from ckptguard.integrations.accelerate import save_state

    assert [iteration_from_name(n) for n in ("checkpoint_0", "checkpoint_12")] == [0, 12]
    assert {iteration_from_name(n) for n in ("checkpoint_007", "checkpoint_-1", "checkpoint_1e3", "checkpoint_٣")} == {
        None
    }
    run = tmp_path / "run"
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path)))
    acc.prepare(torch.nn.Linear(2, 2))
    save_state(acc, run, 3)  # checkpoint-3
    acc.project_configuration.automatic_checkpoint_naming, acc.project_configuration.iteration = True, 3
    newest = save_state(acc, run, 1)  # checkpoint_3, saved last, of step 1
    for odd in ("checkpoint_007", "checkpoint_-1", "checkpoint_1e3"):
        shutil.copytree(newest, run / odd)
    assert sorted((c.name, c.step) for c in discover(run)) == [("checkpoint-3", 3), ("checkpoint_3", 1)]
    assert load_state(acc, run) == run / "checkpoint_3" and acc.save_iteration == 4
