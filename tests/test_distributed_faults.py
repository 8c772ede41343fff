"""Two real ranks (gloo on CPU) save through CheckpointManager; one rank fails mid-save.

Faults: rank 1's own state object raises inside ``state_dict()`` (a real exception in user code
during the snapshot; rank 1 then stays alive, handling it), or rank 1 is SIGKILLed at that moment.
Every surviving rank must raise a CheckpointError that names rank 1, promptly or at the latest
within the coordination timeout, never hang; the run directory keeps the earlier checkpoint and
gains no half-written one. Each rank is a separate process with a hard timeout on top.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckptguard import verify_checkpoint
from faultkit import free_port

TIMEOUT_S = 10.0  # the manager's bound on every collective
HANG_S = 600  # a rank still running this long is stuck past every timeout; far past a slow machine's run

_RANK = r"""
import json, os, signal, sys
import torch, torch.distributed as dist
from ckptguard import CheckpointManager, per_rank
from ckptguard.errors import CheckpointError

run_dir, port, rank, fault, timeout_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)


class Shard:
    armed = False

    def state_dict(self):
        if self.armed and rank == 1:
            if fault == "raise":
                raise RuntimeError("optimizer shard is on a lost device")
            os.kill(os.getpid(), signal.SIGKILL)
        return {"t": torch.full((4096,), float(rank))}

    def load_state_dict(self, state):
        pass


shard = Shard()
mgr = CheckpointManager(run_dir, timeout_s=timeout_s)
mgr.save(1, {"shard": per_rank(shard), "step": 1})
shard.armed = True
try:
    mgr.save(2, {"shard": per_rank(shard), "step": 2})
    out = {"ok": True}
except Exception as e:
    out = {"ok": False, "type": type(e).__name__, "checkpoint_error": isinstance(e, CheckpointError),
           "rank": getattr(e, "rank", None), "text": str(e)}
print(json.dumps(out), flush=True)
# A failed rank stays alive until rank 0 is done, as a trainer does while it handles the error:
# rank 0 must be told by the save itself, not by the peer's connection closing. The parent closes
# rank 1's stdin once rank 0 has exited.
if rank == 1:
    sys.stdin.read()
os._exit(0)  # leave without a teardown collective the dead peer could never join
"""


def _run_two_ranks(run_dir: Path, fault: str) -> list[dict[str, Any] | None]:
    """Start both ranks, wait with a hard bound; returns each rank's report (None: it died)."""
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, str(run_dir), port, str(rank), fault, str(TIMEOUT_S)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    reports: list[dict[str, Any] | None] = []
    for proc in procs:  # rank 0 first: rank 1's stdin stays open until rank 0 has exited
        try:
            out, err = proc.communicate(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a rank hung past every timeout (fault={fault})")
        lines = out.strip().splitlines()
        reports.append(json.loads(lines[-1]) if lines else None)
        if proc.returncode not in (0, -signal.SIGKILL):
            pytest.fail(f"rank exited with {proc.returncode}:\n{err[-3000:]}")
    return reports


def _assert_run_dir_kept_step_1(run_dir: Path) -> None:
    names = sorted(p.name for p in run_dir.iterdir())
    assert "checkpoint-2" not in names and not [n for n in names if n.startswith(".staging-")], names
    assert (run_dir / "LATEST").read_text().strip() == "checkpoint-1"
    assert verify_checkpoint(run_dir / "checkpoint-1", level="full").ok


def test_exception_in_one_ranks_state_dict_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    rank0, rank1 = _run_two_ranks(tmp_path / "run", "raise")
    assert rank0 is not None and rank1 is not None
    for report in (rank0, rank1):
        assert report["checkpoint_error"], report
        assert report["rank"] == 1 and "rank=1" in report["text"], report
        assert "optimizer shard is on a lost device" in report["text"], report
    # told by the save's agreement, with rank 1's own error, not left to wait out the timeout
    assert rank0["type"] != "CoordinationError" and "never reached" not in rank0["text"], rank0
    _assert_run_dir_kept_step_1(tmp_path / "run")


def test_rank_killed_mid_save_fails_the_survivor_within_the_timeout(tmp_path: Path) -> None:
    rank0, rank1 = _run_two_ranks(tmp_path / "run", "kill")
    assert rank1 is None  # SIGKILLed before it could report
    assert rank0 is not None and rank0["checkpoint_error"], rank0
    assert rank0["type"] == "CoordinationError", rank0
    assert rank0["rank"] == 1 and "rank=1" in rank0["text"], f"the dead rank must be named: {rank0}"
    assert "rank 1 never reached it" in rank0["text"], rank0
    _assert_run_dir_kept_step_1(tmp_path / "run")
