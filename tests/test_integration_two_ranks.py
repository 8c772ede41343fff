"""The HF Trainer and Accelerate integrations on two real processes (gloo on CPU), each library alike."""

from __future__ import annotations

import os

import pytest

from faultkit import tmpfs
from integrationkit import require
from integrationranks import full_disk_on_two_ranks, kill_two_ranks_then_resume, rank_outcomes, ranks

LIBRARIES = ["hf", "accelerate"]
KILL_TRIALS = int(os.environ.get("CKPTGUARD_KILL_TRIALS", "4")) // 4 or 1  # each trial starts four processes


@pytest.mark.slow
@pytest.mark.parametrize("library", LIBRARIES)
def test_both_ranks_killed_mid_run_resume_on_the_newest_verified_checkpoint(library, tmp_path):
    """Both ranks SIGKILLed at a random instant after a save; two fresh ranks resume at the newest verified one."""
    require(library)
    for newest, resumed in kill_two_ranks_then_resume(library, tmp_path / "run", KILL_TRIALS):
        assert resumed == [newest, newest]


@pytest.mark.slow
@pytest.mark.parametrize("library", LIBRARIES)
def test_full_disk_mid_save_fails_on_both_ranks_with_the_same_typed_error(library, tmp_path):
    require(library)
    with tmpfs(tmp_path / "disk", size="8m") as disk:
        full_disk_on_two_ranks(library, disk)


def test_lightning_ddp_fails_a_full_disk_on_both_ranks_then_resumes_from_last(tmp_path):
    """Lightning's DDP on two gloo ranks, VerifiedCheckpointIO passed as a plugin and nothing else: the disk
    fills after step 2; once it has room again, ``ckpt_path="last"`` resumes both ranks at step 2."""
    import errno

    from ckptguard import verify_checkpoint

    require("lightning")

    def verified(out):
        found = {p.name: verify_checkpoint(p) for p in out.glob("*.ckpt")}
        return {name: r.manifest.step for name, r in found.items() if r.ok and r.manifest}

    with tmpfs(tmp_path / "disk", size="8m") as disk:
        out = disk / "run"
        outcomes = rank_outcomes(ranks("lightning", out, "enospc", disk))
        assert outcomes == [{"type": "WriteError", "errno": errno.ENOSPC, "step": 3}] * 2
        assert verified(out) == {"epoch=0-step=1.ckpt": 1, "epoch=0-step=2.ckpt": 2, "last.ckpt": 2}
        assert not [p.name for p in out.iterdir() if p.name.startswith(".staging")]
        (disk / "filler.bin").unlink()
        assert [r["resumed"] for r in rank_outcomes(ranks("lightning", out, "resume"))] == [2, 2]
        assert verified(out) == {"epoch=0-step=3.ckpt": 3, "epoch=0-step=4.ckpt": 4, "last.ckpt": 4}
