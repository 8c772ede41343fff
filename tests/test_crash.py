"""Crash consistency: a saving process SIGKILLed at a random instant never leaves a loadable wreck.

Each trial forks a child that resumes from the run directory and saves steps as fast as it can,
reporting a step only after ``save()`` returned; it is SIGKILLed after a random (seeded) delay.
Then this process resumes with a fresh CheckpointManager and checks that it got the newest
committed step, with exactly that step's tensors, and that no staging directory survived startup.
The run directory carries over from trial to trial, like a job that is preempted again and again.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from faultkit import CRASH_LITTER, STARTUP_LITTER, CrashHarness, check_resume, kill_phase

TRIALS = 100
SEED = 20240611
MAX_DELAY_S = 0.25  # a few saves of ~270 KB each: kills land in write, commit and between saves


def run_trials(
    run_dir: Path,
    trials: int,
    seed: int,
    *,
    async_save: bool = False,
    max_delay_s: float = MAX_DELAY_S,
    litter: tuple[str, ...] = CRASH_LITTER,
    from_fork: float = 1.0,
) -> Counter[str]:
    """Kill and resume `trials` times; returns how many kills landed in each phase of a save.

    A share `from_fork` of the trials counts the delay from the fork, the others from when the child
    has resumed: on a busy machine start-up takes longer, and delays from the fork alone would land
    there and test the save itself less.
    """
    rng = random.Random(seed)
    phases: Counter[str] = Counter()
    floor = 0  # newest step known to be committed
    with CrashHarness() as harness:
        for i in range(trials):
            delay, after_start = rng.uniform(0.0, max_delay_s), rng.random() >= from_fork
            trial = harness.trial(run_dir, delay, async_save=async_save, after_start=after_start)
            clock = "the child's start" if after_start else "the fork"
            where = f"trial {i} (seed {seed}, async={async_save}, kill {delay:.3f} s after {clock}): {trial}"
            assert trial.error is None, where
            assert trial.killed, f"{where}: the child ended before the kill"
            assert trial.start in (None, floor), f"{where}: the child resumed at {trial.start}, not {floor}"
            floor = max([floor, *trial.saved])
            # no "start" line: the kill landed before the child finished its preflight and restore
            phases["startup" if trial.start is None else kill_phase(run_dir, floor)] += 1
            try:
                floor = check_resume(run_dir, floor, litter)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from exc
    return phases


def test_sigkill_at_random_instants_always_resumes_newest_committed_step(tmp_path: Path) -> None:
    phases = run_trials(tmp_path / "run", TRIALS, SEED, from_fork=0.25)
    # The trials must actually have hit the save itself, not only the gaps between saves.
    assert phases["write"] >= 10 and phases["commit"] >= 3, phases


def test_sigkill_during_background_saves_resumes_newest_committed_step(tmp_path: Path) -> None:
    # The child updates its tensors in place right after save(blocking=False) returns: a snapshot
    # that still aliased them would commit the next step's values under this step's name.
    phases = run_trials(tmp_path / "run", TRIALS // 2, SEED + 1, async_save=True, from_fork=0.25)
    assert phases["write"] >= 5 and phases["commit"] >= 2, phases


def test_sigkill_during_startup_leaves_nothing_behind(tmp_path: Path) -> None:
    # Kills in the first few milliseconds land in the preflight (write probe, lock, cleanup) and
    # restore: a job preempted again and again must not pile up probe directories.
    phases = run_trials(tmp_path / "run", 30, SEED + 2, max_delay_s=0.03, litter=CRASH_LITTER + STARTUP_LITTER)
    assert phases["startup"] >= 10, f"too few kills landed during startup to test it: {phases}"
