"""Async saving: same bytes as blocking, one save in flight, background errors never lost."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ckptguard import CheckpointManager, WriteError, estimate_bytes, verify_checkpoint
from conftest import make_training_state
from faultkit import tmpfs


def data_files(ckpt: Path) -> dict[str, bytes]:
    return {
        p.relative_to(ckpt).as_posix(): p.read_bytes()
        for p in ckpt.rglob("*")
        if p.is_file() and p.name != "MANIFEST.json"
    }


def test_async_and_blocking_saves_are_byte_identical(tmp_path):
    state = make_training_state()
    with CheckpointManager(tmp_path / "a") as mgr:
        mgr.save(3, state)
    with CheckpointManager(tmp_path / "b", async_save=True) as mgr:
        assert mgr.save(3, state) is None
        result = mgr.wait()
    assert result.step == 3 and result.stall_seconds <= result.seconds
    assert data_files(tmp_path / "a/checkpoint-3") == data_files(tmp_path / "b/checkpoint-3")


def test_async_snapshot_is_taken_at_save_time_not_at_write_time(tmp_path):
    state = make_training_state()
    expected = {k: v.clone() for k, v in state["model"].state_dict().items()}
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, state, blocking=False)
        with torch.no_grad():  # training goes on while the background writer runs
            for p in state["model"].parameters():
                p.add_(100.0)
        mgr.wait()
        fresh = make_training_state(seed=5)
        mgr.restore(fresh)
    for k, v in fresh["model"].state_dict().items():
        assert torch.equal(v, expected[k])


def test_at_most_one_save_in_flight(tmp_path):
    state = make_training_state()
    with CheckpointManager(tmp_path / "run", verify="deep") as mgr:
        for step in range(1, 6):
            mgr.save(step, state, blocking=False)
            # when save() returns, every earlier save has finished (committed and verified)
            done = sorted(r.step for r in mgr.results)
            assert done == list(range(1, step)), done
        mgr.wait()
    assert all(verify_checkpoint(tmp_path / f"run/checkpoint-{s}").ok for s in range(1, 6))


def fill_until(path: Path, leave_bytes: int) -> None:
    st = os.statvfs(path)
    with open(path / "filler", "wb") as fh:
        fh.write(b"\0" * (st.f_bavail * st.f_frsize - leave_bytes))


# eight files whose sizes sit just past a page boundary: the byte estimate fits, the pages do not
PAGE_EDGE_STATE = {f"t{i}": {"w": torch.ones(1025)} for i in range(8)}


def test_background_enospc_is_logged_at_once_and_raised_at_next_save_and_close(tmp_path, caplog):
    with tmpfs(tmp_path / "disk", size="4m") as disk:
        mgr = CheckpointManager(disk / "run")
        mgr.save(1, PAGE_EDGE_STATE)
        fill_until(disk, estimate_bytes(PAGE_EDGE_STATE) + 4096)
        mgr.save(2, PAGE_EDGE_STATE, blocking=False)
        deadline = time.monotonic() + 30
        while not any(r.levelno == logging.ERROR for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any("ENOSPC" in r.getMessage() for r in caplog.records), "logged at once, before any wait"
        with pytest.raises(WriteError) as info:
            mgr.save(3, PAGE_EDGE_STATE)
        assert info.value.errno == 28 and info.value.step == 2 and "/run/.staging-checkpoint-2-" in info.value.path
        assert not [p for p in (disk / "run").iterdir() if p.name.startswith(".staging")]
        assert verify_checkpoint(disk / "run/checkpoint-1").ok
        assert (disk / "run/LATEST").read_text().strip() == "checkpoint-1"
        # a second background failure surfaces at close()
        mgr.save(4, PAGE_EDGE_STATE, blocking=False)
        with pytest.raises(WriteError, match="No space left"):
            mgr.close()


def test_sigkill_during_background_writes_never_leaves_a_loadable_partial_checkpoint(tmp_path):
    run = tmp_path / "run"
    child = textwrap.dedent(
        f"""
        import sys, torch
        from ckptguard import CheckpointManager
        mgr = CheckpointManager({str(run)!r}, keep_last=2, async_save=True)
        for step in range(1, 10_000):
            mgr.save(step, {{"w": torch.full((256, 1024), float(step)), "step": step}})
            print(step - 1, flush=True)  # save(step) returned: step - 1 has committed
        """
    )
    for trial in range(5):
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        committed = [int(proc.stdout.readline()) for _ in range(3 + trial)]
        time.sleep(0.01 * trial)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        with CheckpointManager(run) as mgr:
            restored = mgr.restore({"w": None, "step": None})
        assert restored is not None and restored.step >= committed[-1]
        assert restored.values["step"] == restored.step
        assert torch.equal(restored.values["w"], torch.full((256, 1024), float(restored.step)))
