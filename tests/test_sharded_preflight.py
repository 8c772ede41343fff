"""Ranks that do not share the run directory are refused at construction, before step 1.

Rank 1 runs in its own mount namespace with a private tmpfs over the run directory: the same
path, a different filesystem, as on a node whose "runs/" is a local disk. Both ranks must raise
the same PreflightError naming rank 1, and rank 0's real run directory must hold no checkpoint
and no probe left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from faultkit import launch_ranks

_RANK = """
import json, sys
import torch.distributed as dist
from ckptguard import CheckpointManager
from ckptguard.errors import CheckpointError
dist.init_process_group("gloo")
try:
    CheckpointManager(sys.argv[1], timeout_s=20).close()
    print(json.dumps({"ok": True}))
except CheckpointError as e:
    print(json.dumps({"ok": False, "type": type(e).__name__, "text": str(e)}))
"""


def _private_run_dir(run_dir: Path) -> list[str]:
    """argv prefix: a new mount namespace with a private tmpfs mounted over `run_dir`."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("a private mount namespace needs root and unshare(1)")
    script = 'mount -t tmpfs -o size=8m tmpfs "$0" && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(run_dir)]


def _outcomes(run_dir: Path, rank1_prefix: list[str]) -> list[dict[str, object]]:
    cmd = [sys.executable, "-c", _RANK, str(run_dir)]
    procs = launch_ranks([cmd, rank1_prefix + cmd])
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert out.strip(), err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_rank_on_a_node_local_disk_is_refused_at_construction(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    outcomes = _outcomes(run_dir, _private_run_dir(run_dir))
    assert [o["type"] for o in outcomes] == ["PreflightError", "PreflightError"], outcomes
    assert outcomes[0]["text"] == outcomes[1]["text"]
    assert str(outcomes[0]["text"]).startswith("rank 1 cannot see the run directory rank 0 writes to")
    assert "every node mounts" in str(outcomes[0]["text"])
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith((".ckptguard-probe", "checkpoint-"))]


def test_ranks_sharing_the_run_directory_pass(tmp_path: Path) -> None:
    assert _outcomes(tmp_path, []) == [{"ok": True}, {"ok": True}]
