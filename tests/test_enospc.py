"""A disk that fills up during a save: typed error, no staging left, LATEST and older checkpoints intact.

The disk is a real size- or inode-limited tmpfs, taken up by a real allocated file (or real empty
files) so that exactly the wanted amount stays free. The sweeps walk the free space one page (or
one inode) at a time from "refused up front" to "fits", so ENOSPC strikes at every point of a save
in turn: a tensor file, the JSON, the manifest, LATEST.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from ckptguard import CheckpointManager, estimate_bytes, per_rank, verify_checkpoint
from ckptguard.errors import CheckpointError, InsufficientSpaceError, WriteError
from faultkit import Filler, StepState, tmpfs

ENOSPC_REMEDY = "The filesystem is full: free space, lower keep_last, or use a larger disk."


def _save_steps(mgr: CheckpointManager, model: StepState, steps: list[int], **extra: Any) -> None:
    for step in steps:
        model.advance(step)
        mgr.save(step, {"model": model, "step": step, **extra})


def _run_dir_state(run: Path) -> tuple[list[str], bytes]:
    """What must not change when a save fails: the entries (the event log aside) and LATEST."""
    return sorted(p.name for p in run.iterdir() if p.name != "events.jsonl"), (run / "LATEST").read_bytes()


def _attempt(mgr: CheckpointManager, step: int, state: dict[str, Any]) -> CheckpointError | None:
    try:
        mgr.save(step, state)
    except CheckpointError as exc:
        return exc
    return None


def _assert_failed_cleanly(run: Path, before: tuple[list[str], bytes], error: CheckpointError) -> None:
    assert isinstance(error, (InsufficientSpaceError, WriteError)), repr(error)
    assert error.errno == errno.ENOSPC, error
    entries, latest = _run_dir_state(run)
    assert not [e for e in entries if e.startswith(".staging-")], f"staging left after {error}"
    assert latest == before[1], f"LATEST changed by a failed save ({error})"
    assert entries == before[0], f"a failed save changed the run directory ({error})"
    for name in entries:
        if name.startswith("checkpoint-"):
            report = verify_checkpoint(run / name, level="full")
            assert report.ok, f"{name} damaged by a failed save: {report.problems}"


def _assert_resumes(run: Path, newest: int, older: int) -> None:
    """A fresh manager resumes the newest step, and an older one still restores on request."""
    with CheckpointManager(run) as mgr:
        for step in (None, older):
            model = StepState(-1)
            restored = mgr.restore({"model": model, "step": 0}, step=step)
            assert restored is not None
            assert restored.step == (step or newest) and model.matches(restored.step)


def test_disk_full_mid_write_raises_write_error_and_keeps_older_checkpoints(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="4m") as disk:
        run, model = disk / "run", StepState()
        with CheckpointManager(run) as mgr:
            _save_steps(mgr, model, [1, 2])
            before = _run_dir_state(run)
            filler, page = Filler(disk), os.statvfs(disk).f_frsize
            model.advance(3)
            state = {"model": model, "step": 3}
            need = estimate_bytes(state)
            # From "refused before writing" upwards: the first size the space check lets through
            # runs out of pages part-way through the files.
            for free in range(need - 4 * page, need + 8 * page, page):
                filler.leave_bytes(free)
                error = _attempt(mgr, 3, state)
                if not isinstance(error, InsufficientSpaceError):
                    break
            assert isinstance(error, WriteError), f"no free size made the write itself fail: {error!r}"
            assert error.message == "could not write checkpoint file: No space left on device"
            assert error.step == 3 and error.remedy == ENOSPC_REMEDY
            _assert_failed_cleanly(run, before, error)
            filler.release()
            assert mgr.save(3, state) is not None  # with space back, the same manager saves again
        _assert_resumes(run, newest=3, older=1)


def _sweep(mgr: CheckpointManager, run: Path, state: dict[str, Any], leave: Any, start: int, unit: int) -> int:
    """Save step 3 with `start`, `start + unit`, ... left free until it fits; check every failure.

    Returns how many attempts failed. `leave(n)` makes exactly n bytes or inodes free.
    """
    before = _run_dir_state(run)
    for attempt in range(32):
        leave(start + attempt * unit)
        error = _attempt(mgr, 3, state)
        if error is None:
            return attempt
        _assert_failed_cleanly(run, before, error)
    raise AssertionError(f"step 3 never fit, even with {start + 31 * unit} free")


def test_disk_full_at_every_point_of_a_save_leaves_the_run_dir_as_it_was(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="4m") as disk:
        run, model = disk / "run", StepState()
        with CheckpointManager(run) as mgr:
            _save_steps(mgr, model, [1, 2])
            filler, page = Filler(disk), os.statvfs(disk).f_frsize
            model.advance(3)
            state = {"model": model, "step": 3}
            assert _sweep(mgr, run, state, filler.leave_bytes, estimate_bytes(state) - 4 * page, page) > 4
        _assert_resumes(run, newest=3, older=2)


def test_inodes_run_out_past_the_byte_preflight(tmp_path: Path) -> None:
    # Plenty of bytes, few inodes: the byte-count preflight passes, so only the inode count protects
    # the run. Per-rank state adds a directory level (state/rank0/), as in a real distributed run.
    with tmpfs(tmp_path / "disk", size="64m", nr_inodes=96) as disk:
        run, model, rng = disk / "run", StepState(), per_rank(StepState(7))
        with CheckpointManager(run, expected_bytes=estimate_bytes({"model": model, "rng": rng})) as mgr:
            _save_steps(mgr, model, [1, 2], rng=rng)
            model.advance(3)
            state = {"model": model, "step": 3, "rng": rng}
            filler = Filler(disk)
            assert _sweep(mgr, run, state, filler.leave_inodes, 0, 1) > 0
        filler.release()  # a new manager is a writer: its own preflight needs a few free inodes
        _assert_resumes(run, newest=3, older=1)
