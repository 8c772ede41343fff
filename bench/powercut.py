"""Cut the power N times per save mode; ckptguard must lose nothing, the naive and broken savers must.

    python bench/powercut.py                       # 200 cuts per mode, every mode
    python bench/powercut.py --cuts 50 --modes blocking naive --seed 3

Uses the power-cut filesystem and trials of the tests (tests/powerfs.py, tests/powercut.py). Prints,
per mode: cuts, how many landed mid-save, acknowledged saves, lost acknowledged checkpoints, broken
loads, bad LATEST, dirty restarts, saver errors and the time. Exit status 1 if a ckptguard mode
failed even once, or if the naive saver or the build with one fsync removed was never caught.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# The kit lives with the tests it serves.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from faultkit import CrashHarness
from powercut import BROKEN_FSYNC, MODES, MUST_FAIL, trials
from powerkit import fuse_unavailable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cuts", type=int, default=200, help="power cuts per mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()
    reason = fuse_unavailable()
    if reason is not None:
        print(f"cannot run power-cut trials here: {reason}")
        return 1
    print(f"{args.cuts} power cuts per mode, seed {args.seed}; the broken build lacks {BROKEN_FSYNC}", flush=True)
    start = time.monotonic()
    ok = True
    with CrashHarness(preload=("powercut",)) as harness, tempfile.TemporaryDirectory(prefix="powercut-") as tmp:
        for mode in args.modes:
            tally = trials(Path(tmp) / mode, mode, args.cuts, args.seed, harness)
            caught = tally.lost + tally.broken > 0
            verdict = (
                ("caught" if caught else "NOT CAUGHT")
                if mode in MUST_FAIL
                else ("ok" if not tally.failures else "FAILED")
            )
            print(f"{tally.line()}  {verdict}", flush=True)
            for failure in tally.first_failures:
                print(f"    {failure[:300]}")
            ok &= caught if mode in MUST_FAIL else not tally.failures
    print(f"total time {time.monotonic() - start:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
