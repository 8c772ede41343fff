"""SIGKILL a saving process N times at random instants; every resume must be the newest commit.

    python bench/crash_trials.py                 # 1000 trials in a temporary directory
    python bench/crash_trials.py --trials 200 --seed 7 --run-dir /mnt/nvme/crash

Uses the same harness as tests/test_crash.py (tests/faultkit.py). Prints where the kills landed
(write: staging without manifest; commit: manifest written up to LATEST/prune; other: between
saves, preflight, restore) and the number of failures, which must be 0. Exit status 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

# The harness lives with the tests it serves (tests/faultkit.py, tests/test_crash.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_crash import MAX_DELAY_S, run_trials


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, help="where to save (default: a fresh temporary dir)")
    args = parser.parse_args()
    logging.getLogger("ckptguard").setLevel(logging.ERROR)  # one cleanup warning per trial is noise
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crash-trials-") as tmp:
        run_dir = args.run_dir or Path(tmp) / "run"
        try:
            phases = run_trials(run_dir, args.trials, args.seed)
            failure = None
        except AssertionError as exc:
            phases, failure = None, str(exc)
    seconds = time.monotonic() - start
    if failure is not None:
        print(f"FAILED after {seconds:.1f} s: {failure}")
        return 1
    assert phases is not None
    print(
        f"trials={args.trials} seed={args.seed} max_delay={MAX_DELAY_S}s "
        f"kills: write={phases['write']} commit={phases['commit']} other={phases['other']} "
        f"failures=0 time={seconds:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
