"""The HF Trainer and Accelerate integrations on two real processes (gloo on CPU), each library alike."""

from __future__ import annotations

import os

import pytest

from faultkit import tmpfs
from integrationkit import require
from integrationranks import full_disk_on_two_ranks, kill_two_ranks_then_resume

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
