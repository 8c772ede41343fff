"""background.py: a background save in flight when the script ends, or when the process forks.

Each case is a real interpreter that starts an async save of ~64 MB and then ends (last line,
``sys.exit``, an unhandled exception, ``del mgr``) or forks. What is on disk afterwards is judged
by a fresh verification, and events.jsonl must say what happened.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ckptguard import verify_checkpoint
from ckptguard.files.events import read_events
from faultkit import tmpfs

_PRELUDE = """
import os, sys, torch
from ckptguard import CheckpointManager
run_dir = sys.argv[1]
state = {"w": torch.randn(16, 1 << 20), "step": 1}   # 64 MiB: still being written when the script ends
mgr = CheckpointManager(run_dir, async_save=True)
mgr.save(1, state)
"""

ENDINGS = {
    "last line": "",
    "sys.exit(0)": "sys.exit(0)",
    "unhandled exception": "raise RuntimeError('the training loop crashed')",
    "del mgr": "del mgr",
}


def _run(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_background_save_in_flight_at_exit_is_finished_and_logged(tmp_path: Path, ending: str) -> None:
    run = tmp_path / "run"
    done = _run(_PRELUDE + ENDINGS[ending], str(run))
    assert done.returncode == (1 if ending == "unhandled exception" else 0), done.stderr
    assert "cannot schedule new futures" not in done.stderr, done.stderr
    assert verify_checkpoint(run / "checkpoint-1", "full").ok, f"{ending}: the save was lost: {done.stderr}"
    assert [e["step"] for e in read_events(run) if e["event"] == "save"] == [1]
    assert not list(run.glob(".staging-*"))


def test_a_background_save_that_fails_at_exit_is_logged_not_lost(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", size="8m") as small:
        run = small / "run"
        code = _PRELUDE.replace("1 << 20", "1 << 17")  # 8 MiB of tensors on an 8 MiB filesystem
        done = _run(code, str(run))
        assert done.returncode == 0, done.stderr
        failures = [e for e in read_events(run) if e["event"] == "save_failed"]
        assert (
            failures and failures[0]["step"] == 1 and failures[0]["error"] in ("WriteError", "InsufficientSpaceError")
        )
        assert "a background save failed and was never waited for" in done.stderr
        assert not (run / "checkpoint-1").exists() and not list(run.glob(".staging-*"))


_FORK = (
    _PRELUDE
    + """
import json, signal, time
from ckptguard.errors import CheckpointError
signal.alarm(60)  # a hang in either process ends the test as a failure, not a stuck suite
pid = os.fork()
if pid == 0:
    out = {}
    try:
        mgr.save(2, state)
    except CheckpointError as exc:
        out["save"] = str(exc)
    try:
        CheckpointManager(run_dir)
    except CheckpointError as exc:
        out["second"] = f"{type(exc).__name__}: {exc}"
    mgr.close()  # forgets the parent's save and lock; must neither wait nor unlock
    print(json.dumps(out), flush=True)
    sys.exit(0)  # the normal exit path, with every exit hook
_, status = os.waitpid(pid, 0)
mgr.wait()
mgr.save(3, state, blocking=True)
print(json.dumps({"child_status": status, "parent": os.getpid()}), flush=True)
mgr.close()
"""
)


def test_a_forked_child_neither_waits_for_nor_saves_into_the_parents_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = _run(_FORK, str(run), timeout=120)
    assert done.returncode == 0, done.stderr
    child, parent = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert parent["child_status"] == 0, "the child hung or crashed at exit"
    assert "inherited through fork" in child["save"] and f"process {parent['parent']}" in child["save"]
    assert child["second"].startswith("LockedError") and f"pid {parent['parent']}" in child["second"], child
    for step in (1, 3):
        assert verify_checkpoint(run / f"checkpoint-{step}", "full").ok
    assert not (run / "checkpoint-2").exists()
    assert (run / "LATEST").read_text().strip() == "checkpoint-3"
