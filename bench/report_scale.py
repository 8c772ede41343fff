"""The run report at scale: time, peak RSS and page size for a run of 20,000 and 100,000 saves.

    .venv/bin/python bench/report_scale.py [--saves 20000 100000] [--out bench/results]

The run is an events.jsonl written here, line by line as the trainer logs it (a train and an eval
line per save, a verify and a prune, keep_last=2, one save in FAILED_EVERY failing). Each report is
written in its own process, so its peak RSS (ru_maxrss) is the report's alone. Prints a table and
writes report_scale.md and report_scale.json into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAILED_EVERY = 1000
SIZES = (20_000, 100_000)
T0 = 1_796_000_000  # a fixed start time: the same file every run

_PROBE = """
import json, resource, sys, time
t0 = time.perf_counter()
from ckptguard.report import write_report
page = write_report(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_rss_bytes": rss, "page_bytes": page.stat().st_size}))
"""


def write_long_run(run_dir: Path, saves: int, failed_every: int = FAILED_EVERY) -> list[int]:
    """Write `run_dir`/events.jsonl for a run of `saves` saves; returns the steps whose save failed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    failed: list[int] = []
    base = '"host": "bench", "pid": 4242, "rank": 0'
    with (run_dir / "events.jsonl").open("w") as f:
        f.write(
            f'{{"event": "preflight", {base}, "checkpoints": 0, "time": "{_time(0)}", '
            '"policy": {"keep_last": 2, "mode": "min"}}\n'
        )
        kept: list[int] = []
        for step in range(1, saves + 1):
            t = _time(step)
            f.write(
                f'{{"event": "train", {base}, "step": {step}, "loss": {1 / step:.6f}, "lr": 0.0001, "time": "{t}"}}\n'
            )
            f.write(f'{{"event": "eval", {base}, "step": {step}, "eval_loss": {2 / step:.6f}, "time": "{t}"}}\n')
            if step % failed_every == 0:
                failed.append(step)
                f.write(
                    f'{{"event": "save_failed", {base}, "step": {step}, "error": "WriteError", '
                    f'"message": "cannot write checkpoint-{step}: ENOSPC", "time": "{t}"}}\n'
                )
                continue
            f.write(f'{{"event": "verify", {base}, "step": {step}, "ok": true, "level": "full", "time": "{t}"}}\n')
            kept.append(step)
            if len(kept) > 2:
                f.write(f'{{"event": "prune", {base}, "step": {kept.pop(0)}, "time": "{t}"}}\n')
            f.write(
                f'{{"event": "save", {base}, "step": {step}, "bytes": 4096, "seconds": 0.05, "stall_seconds": 0.01, '
                f'"verify": "full", "checkpoint_bytes": 8192, "free_bytes": {10**12 - step}, '
                f'"total_bytes": {2 * 10**12}, "time": "{t}"}}\n'
            )
        f.write(f'{{"event": "run_end", {base}, "step": {saves}, "outcome": "done", "exit_code": 0, "time": "{t}"}}\n')
    return failed


def _time(step: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(T0 + step))


def measure(run_dir: Path, page: Path) -> dict[str, float]:
    """Write the report of `run_dir` in a fresh process: its seconds, peak RSS and page size."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(run_dir), str(page)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saves", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    work = args.out / "work-report"
    rows = []
    for saves in args.saves:
        run = work / f"run-{saves}"
        write_long_run(run, saves)
        events = (run / "events.jsonl").stat().st_size
        got = measure(run, work / f"report-{saves}.html")
        rows.append({"saves": saves, "events_bytes": events, **got})
        print(
            f"{saves:>7} saves ({events / 2**20:.0f} MiB of events): {got['seconds']:.1f} s, "
            f"peak RSS {got['peak_rss_bytes'] / 2**20:.0f} MiB, page {got['page_bytes'] / 2**20:.2f} MiB",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report_scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
