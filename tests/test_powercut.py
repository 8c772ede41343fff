"""Power loss at random instants: every acknowledged checkpoint survives, nothing half-written loads.

Each mode saves on the power-cut filesystem (powerfs.py), loses power at random instants and is
judged after the reboot (powercut.py). A short run here (30 cuts); `make powercut` runs >= 200 per
mode. The naive saver and ckptguard with one fsync removed must fail: that is what shows these
trials can tell a missing fsync from luck, which killing the process alone never can.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from faultkit import CrashHarness
from powercut import MUST_FAIL, trials
from powerkit import fuse_unavailable

pytestmark = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))

SEED = 20261129
CUTS = {"blocking": 6, "async": 5, "lora": 4, "trainer": 5, "naive": 4, "broken": 6}


@pytest.fixture(scope="module")
def harness() -> Iterator[CrashHarness]:
    with CrashHarness(preload=("powercut",)) as zygote:
        yield zygote


@pytest.mark.parametrize("mode", ["blocking", "async", "lora", "trainer"])
def test_power_cut_never_loses_an_acknowledged_checkpoint(tmp_path: Path, harness: CrashHarness, mode: str) -> None:
    tally = trials(tmp_path, mode, CUTS[mode], SEED, harness, after_an_ack=True)
    assert tally.failures == 0, f"{tally.line()}\n" + "\n".join(tally.first_failures)
    # The cuts must have landed after acknowledged saves. Whether a few cuts also land mid-save is
    # chance; `make powercut` (200 per mode) reports how many did.
    assert tally.acked > 0, tally.line()


@pytest.mark.parametrize("mode", MUST_FAIL)
def test_power_cut_trials_catch_a_saver_that_skips_an_fsync(tmp_path: Path, harness: CrashHarness, mode: str) -> None:
    tally = trials(tmp_path, mode, CUTS[mode], SEED, harness, after_an_ack=True)
    assert tally.acked > 0, tally.line()
    assert tally.lost + tally.broken > 0, f"the trials did not catch the {mode} saver: {tally.line()}"
