"""The Lightning integration, with the real Lightning Trainer on a tiny Llama on CPU.

The hazard is shown first with Lightning's own CheckpointIO (same model, same data, same fault),
then shown gone with VerifiedCheckpointIO.
"""

from __future__ import annotations

import errno
import os
import random
import re
import time

import pytest
import torch

from ckptguard import verify_checkpoint
from ckptguard.errors import CorruptCheckpointError, WriteError
from faultkit import Filler, flip_bit, tmpfs
from integrationkit import lightning_run

pytest.importorskip("lightning")

from ckptguard.integrations.lightning import newest_verified_ckpt

KILL_TRIALS = int(os.environ.get("CKPTGUARD_KILL_TRIALS", "6"))


def _step(checkpoint) -> int:
    report = verify_checkpoint(checkpoint)
    assert report.ok and report.manifest is not None, report.reason
    return report.manifest.step


def test_bit_flip_plain_lightning_resumes_it_silently_verified_io_refuses_it(tmp_path):
    plain, guarded = tmp_path / "plain", tmp_path / "guarded"
    lightning_run(plain, guarded=False, max_steps=2)
    lightning_run(guarded, guarded=True, max_steps=2)
    flip_bit(plain / "last.ckpt", -2000)
    assert lightning_run(plain, guarded=False, max_steps=2).global_step == 2  # the hazard: loaded, not a word
    flip_bit(guarded / "last.ckpt", 2000)  # inside a tensor's record
    from ckptguard.integrations.lightning import VerifiedCheckpointIO

    with pytest.raises(CorruptCheckpointError, match=r"archive/[^:]+: content hash mismatch"):
        VerifiedCheckpointIO().load_checkpoint(guarded / "last.ckpt")
    assert newest_verified_ckpt(guarded) == str(guarded / "epoch=0-step=2.ckpt"), "the intact copy of step 2"


def test_random_kills_then_resume_lands_on_the_newest_verified_checkpoint(integration_harness, tmp_path):
    rng = random.Random(5)
    for _ in range(KILL_TRIALS):
        newest = newest_verified_ckpt(tmp_path)
        expected = _step(newest) if newest else 0
        trial = integration_harness.trial(tmp_path, rng.uniform(0.3, 1.5), saver="lightning_saver")
        assert trial.error is None, trial.error
        # start None: killed while it started up (a loaded machine), before it resumed anything
        assert trial.start in (None, expected), f"resumed at {trial.start}, {newest} is the newest verified"
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".ckpt" and not verify_checkpoint(p).ok]


def test_full_disk_mid_save_is_a_typed_error_and_older_checkpoints_stay(tmp_path):
    with tmpfs(tmp_path / "disk", size="8m") as disk:
        out, filler = disk / "run", Filler(disk)

        def fill(step: int) -> None:
            if step == 2:
                while any(p.name.startswith(".trash-") for p in out.iterdir()):  # the replaced last.ckpt, freeing
                    time.sleep(0.01)
                filler.leave_bytes(64 << 10)

        with pytest.raises(WriteError) as caught:
            lightning_run(out, guarded=True, max_steps=4, after_save=fill)
        assert caught.value.errno == errno.ENOSPC and caught.value.step == 3
        assert sorted(os.listdir(out)) == [
            "epoch=0-step=1.ckpt",
            "epoch=0-step=2.ckpt",
            "last.ckpt",
        ]
        assert _step(out / "last.ckpt") == 2


def test_removal_waits_for_the_save_in_flight_and_keeps_the_old_one_if_it_failed(tmp_path):
    """What AsyncCheckpointIO does: submit the new save, then at once remove the previous checkpoint."""
    from concurrent.futures import ThreadPoolExecutor

    from ckptguard.integrations.lightning import VerifiedCheckpointIO

    io = VerifiedCheckpointIO()
    old, new = tmp_path / "epoch=0-step=1.ckpt", tmp_path / "epoch=0-step=2.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.zeros(4)}, old)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(io.save_checkpoint, {"global_step": 2, "w": torch.ones(16 << 20)}, new)
        while not list(tmp_path.glob(".partial-*")) and not pending.done():  # under way: counted in flight
            time.sleep(0.001)
        io.remove_checkpoint(old)
        assert verify_checkpoint(new).ok, "the previous checkpoint was removed before the newer one was committed"
        pending.result()
    assert not old.exists()
    with tmpfs(tmp_path / "disk", size="8m") as disk:
        kept = disk / "epoch=0-step=2.ckpt"
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(4)}, kept)
        with pytest.raises(WriteError):
            io.save_checkpoint({"global_step": 3, "w": torch.ones(4 << 20)}, disk / "epoch=0-step=3.ckpt")
        io.remove_checkpoint(kept)
        assert verify_checkpoint(kept).ok, "the only good checkpoint was removed after the newer save failed"


def test_async_removal_right_after_a_queued_save_waits_for_that_save_to_commit(tmp_path):
    """AsyncCheckpointIO submits the new save and Lightning at once asks to remove the previous checkpoint.
    Here the worker is still busy (a gate), so the new save has not even started when the removal comes."""
    import threading
    from types import SimpleNamespace

    from lightning.pytorch.plugins import AsyncCheckpointIO
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from ckptguard.integrations.lightning import LightningGuard, VerifiedCheckpointIO

    def queued_behind_a_busy_worker(step: int, size: int, target, previous) -> threading.Event:
        gate = threading.Event()
        async_io._ensure_setup()
        async_io._executor.submit(gate.wait)  # an earlier save still being written
        async_io.save_checkpoint({"global_step": step, "w": torch.ones(size)}, target)
        async_io.remove_checkpoint(previous)
        return gate

    with tmpfs(tmp_path / "disk", size="8m") as disk:
        async_io = AsyncCheckpointIO(VerifiedCheckpointIO())
        trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu", checkpoint_io=async_io), world_size=1)
        LightningGuard().setup(trainer, None, "fit")
        old, new, failing = (disk / f"epoch=0-step={step}.ckpt" for step in (1, 2, 3))
        async_io.save_checkpoint({"global_step": 1, "w": torch.zeros(4)}, old)
        async_io.teardown()  # written
        gate = queued_behind_a_busy_worker(2, 4, new, old)
        assert verify_checkpoint(old).ok, "the previous checkpoint was removed before the newer save started"
        gate.set()
        async_io.teardown()
        assert not old.exists() and _step(new) == 2
        queued_behind_a_busy_worker(3, 4 << 20, failing, new).set()  # 16 MiB on an 8 MiB disk
        with pytest.raises(WriteError) as caught:
            async_io.teardown()
        assert caught.value.errno == errno.ENOSPC
        assert _step(new) == 2, "the only good checkpoint was removed after the newer save failed"


def test_a_missing_ckpt_path_is_not_found_not_corrupt_and_still_a_file_not_found_error(tmp_path):
    from ckptguard.errors import CheckpointNotFoundError
    from ckptguard.integrations.lightning import VerifiedCheckpointIO

    missing = tmp_path / "epoch=0-step=9.ckpt"
    expected = f"Checkpoint file not found: {re.escape(str(missing))}"
    with pytest.raises(CheckpointNotFoundError, match=expected) as caught:
        VerifiedCheckpointIO().load_checkpoint(missing)
    assert caught.value.path == str(missing) and "typo" in caught.value.remedy
    # a user's `except FileNotFoundError` around Lightning's own loader goes on catching it
    assert isinstance(caught.value, FileNotFoundError) and caught.value.errno == errno.ENOENT


def test_a_plain_file_is_refused_as_unverifiable_not_as_corrupt(tmp_path):
    from ckptguard.integrations.lightning import VerifiedCheckpointIO

    plain = tmp_path / "foo.ckpt"
    torch.save({"global_step": 1}, plain)  # what Lightning's own TorchCheckpointIO writes
    with pytest.raises(CorruptCheckpointError, match="a file saved without ckptguard") as caught:
        VerifiedCheckpointIO().load_checkpoint(plain)
    assert caught.value.path == str(plain) and "library's own loader" in caught.value.remedy


def test_the_plugin_survives_deepcopy_and_pickling_and_the_copy_saves_verified(tmp_path):
    """What ddp_spawn, ``deepcopy(trainer.callbacks)`` and ``torch.save(trainer)`` do to the plugin."""
    import copy
    import pickle

    from ckptguard.integrations.lightning import VerifiedCheckpointIO

    copies = (copy.deepcopy(VerifiedCheckpointIO()), pickle.loads(pickle.dumps(VerifiedCheckpointIO())))
    for step, copied in enumerate(copies, start=1):
        target = tmp_path / f"epoch=0-step={step}.ckpt"
        copied.save_checkpoint({"global_step": step, "w": torch.zeros(4)}, target)
        copied.remove_checkpoint(tmp_path / "gone.ckpt")
        assert _step(target) == step


@pytest.fixture
def restores_process_state():
    """A refused strategy has already set up torch.distributed (world of one) in this process: undo it."""
    environ = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plugin", "async-plugin"])
def test_a_strategy_that_goes_around_checkpoint_io_is_refused_before_the_first_step(
    wrapped, tmp_path, restores_process_state
):
    """ModelParallelStrategy (FSDP2) writes its own distributed checkpoints: the plugin would never see them."""
    from lightning.pytorch.plugins import AsyncCheckpointIO
    from lightning.pytorch.strategies import ModelParallelStrategy

    from ckptguard.errors import UnsupportedStateError
    from ckptguard.integrations.lightning import VerifiedCheckpointIO

    plugin = AsyncCheckpointIO(VerifiedCheckpointIO()) if wrapped else VerifiedCheckpointIO()
    with pytest.raises(UnsupportedStateError, match=r"ModelParallelStrategy replaces Strategy\.save_checkpoint"):
        lightning_run(tmp_path / "run", guarded=True, max_steps=2, strategy=ModelParallelStrategy(), plugins=[plugin])
    assert not (tmp_path / "run").exists(), "a step ran and saved before the refusal"


def test_plain_lightning_killed_while_rewriting_last_resumes_into_a_torn_file(integration_harness, tmp_path):
    """The hazard: with the run directory on another filesystem than TMPDIR, Lightning's move into place is a
    copy into last.ckpt; a kill during it leaves a torn last.ckpt, which ``ckpt_path="last"`` picks."""
    from lightningkit import BALLAST

    with tmpfs(tmp_path / "disk", size="512m") as disk:
        run = disk / "run"
        trial = integration_harness.trial(run, 120.0, saver="lightningkit:lightning_plain_torn")
        assert trial.killed and trial.saved == [1, 2]
        assert (run / "last.ckpt").stat().st_size < BALLAST * 4, "last.ckpt is cut short"
        # where the cut falls decides the words: a zip archive without its directory, or a seek before its start
        with pytest.raises((RuntimeError, OSError), match=r"zip archive|Invalid argument"):
            lightning_run(run, guarded=False, max_steps=4, ballast=BALLAST)  # ckpt_path="last"


def test_same_kill_with_verified_io_resumes_on_the_newest_verified_checkpoint(integration_harness, tmp_path):
    from lightningkit import BALLAST

    with tmpfs(tmp_path / "disk", size="512m") as disk:
        run = disk / "run"
        trial = integration_harness.trial(run, 120.0, saver="lightningkit:lightning_guarded_torn")
        assert trial.killed and trial.saved == [1, 2]
        assert any(p.name.startswith(".partial-last.ckpt") for p in run.iterdir()), "killed mid-write of last.ckpt"
        assert _step(run / "last.ckpt") == 2, "the last.ckpt being replaced is intact, for ckpt_path='last'"
        assert newest_verified_ckpt(run) == str(run / "epoch=0-step=3.ckpt")
        assert lightning_run(run, guarded=True, max_steps=4, ballast=BALLAST).started_at == 3
        assert _step(run / "last.ckpt") == 4
        assert not [p.name for p in run.iterdir() if p.name.startswith(".partial-")], "the killed save's leftover"


def test_the_end_of_fit_leaves_no_thread_still_deleting_a_removed_checkpoint(tmp_path):
    """Each removal frees its space before it returns, as Lightning's own does: fit (and ddp_spawn's removal
    after it) leaves no thread still deleting and no trash (Lightning's own tests check for such threads)."""
    import threading

    run_dir = tmp_path / "run"

    def fill_step_2(step: int) -> None:  # a checkpoint retention removes later
        assert step != 2 or list(run_dir.glob("*step=2.ckpt"))

    lightning_run(run_dir, guarded=True, max_steps=4, after_save=fill_step_2)
    assert not list(run_dir.glob("*step=2.ckpt")), "step 2 is not among the top 2 by step"
    assert [t.name for t in threading.enumerate() if t.name.startswith("ckptguard-remove")] == []
    assert not list(run_dir.glob(".trash-*"))


def test_a_users_plain_torch_load_of_last_ckpt_reads_the_guarded_file_unchanged(tmp_path):
    """The file Lightning would have written, plus one record torch.load never asks for."""
    trainer = lightning_run(tmp_path, guarded=True, max_steps=2)
    want = trainer.lightning_module.state_dict()
    for kwargs in ({"weights_only": False}, {"weights_only": False, "mmap": True}):
        loaded = torch.load(tmp_path / "last.ckpt", **kwargs)
        assert loaded["global_step"] == 2 and all(torch.equal(want[k], loaded["state_dict"][k]) for k in want)
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
