"""Where a ckptguard save spends its time, next to raw write+fsync of the same bytes.

    .venv/bin/python bench/profile_save.py [--quick] [--repeats 3] [--workload full|lora]

Wraps ckptguard's own functions with timers, in this process only (src/ is not changed), and
prints the median time per phase of a blocking save, then of an async save + wait.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

import baselines as bl
from workloads import Workload, build

HERE = Path(__file__).resolve().parent


class Timers:
    """Seconds and calls per label, summed over threads; `phase` names the top-level step running."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.phase = "other"

    def add(self, label: str, dt: float) -> None:
        with self._lock:
            self.seconds[label] += dt
            self.calls[label] += 1

    def wrap(self, owner: Any, attr: str, label: str, phase: bool = False) -> None:
        orig = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            outer = self.phase
            if phase:
                self.phase = label
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - t0)
                self.phase = outer

        setattr(owner, attr, timed)


TIMERS = Timers()


class _TimedHasher:
    """An xxh3-128 whose updates are timed under the save phase running when they happen."""

    def __init__(self) -> None:
        self._real = xxhash.xxh3_128()

    def update(self, data: Any) -> None:
        t0 = time.perf_counter()
        self._real.update(data)
        TIMERS.add(f"   xxh3 (hash thread) in {TIMERS.phase.split(' (')[0]}", time.perf_counter() - t0)

    def hexdigest(self) -> str:
        return self._real.hexdigest()


class _HashModule:
    """Stands in for the `xxhash` module inside ckptguard.files.hashing (write and verify hash there)."""

    xxh3_128 = _TimedHasher


def instrument() -> None:
    """Wrap the save path's steps (phases) and the primitives inside them, once per process."""
    import ckptguard.catalog.discovery as discovery
    import ckptguard.commit.publish as publish
    import ckptguard.files.durable as durable
    import ckptguard.files.events as events
    import ckptguard.files.hashing as hashing
    import ckptguard.files.writer as writer
    import ckptguard.run.pruning as pruning
    import ckptguard.run.run_dir as run_dir
    import ckptguard.state.snapshot as snapshot
    import ckptguard.state.staging as staging

    t = TIMERS
    t.wrap(snapshot, "take", "1 snapshot.take (flatten state)", phase=True)
    t.wrap(run_dir.RunDir, "check_space", "2 space check + staging dir", phase=True)
    t.wrap(writer, "write_files", "3 write files (write+hash+fsync)", phase=True)
    t.wrap(publish, "_write_manifest", "4 manifest + rename + dir fsyncs", phase=True)
    t.wrap(publish, "verify_checkpoint", "5 verify full (re-read + hash)", phase=True)
    t.wrap(publish, "atomic_write_bytes", "6 LATEST (atomic replace)", phase=True)
    t.wrap(pruning.Pruner, "after_save", "7 retention (prune)", phase=True)
    t.wrap(events.EventLog, "emit", "8 events.jsonl", phase=True)
    t.wrap(staging.HostBuffers, "copy", "0 async: copy into staging buffers", phase=True)
    t.wrap(discovery, "discover", "   discovery.discover (in 2, 7)")
    t.wrap(writer, "write_all", "   os.write to page cache (in 3)")
    t.wrap(durable, "start_writeback", "   sync_file_range early writeback (in 3)")
    hashing.xxhash = _HashModule()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        t0 = time.perf_counter()
        real_fsync(fd)
        t.add(f"   fsync in {t.phase.split(' (')[0]}", time.perf_counter() - t0)

    os.fsync = fsync


def _median_table(title: str, runs: list[dict[str, float]], calls: dict[str, int], wall_key: str) -> None:
    wall = statistics.median(r[wall_key] for r in runs)
    print(f"\n## {title}\n\n| step | seconds (median) | calls | share of save() |\n|---|---|---|---|")
    for label in sorted({k for r in runs for k in r}, key=lambda k: (k.startswith(" "), k)):
        sec = statistics.median(r.get(label, 0.0) for r in runs)
        print(f"| {label} | {sec:.3f} | {calls.get(label, '')} | {sec / wall:.0%} |")


def profile_ckptguard(w: Workload, repeats: int, work: Path) -> None:
    """Median seconds per phase over `repeats` blocking saves, each into a fresh run directory."""
    from guard import GuardSaver

    instrument()
    runs: list[dict[str, float]] = []
    calls: dict[str, int] = {}
    for rep in range(repeats):
        raw = _fresh(work / f"raw{rep}", lambda d: bl.raw_write(w, d))
        saver = GuardSaver(w, work / f"run{rep}")
        TIMERS.reset()
        t0 = time.perf_counter()
        saver.save(1)
        wall = time.perf_counter() - t0
        saver.close()
        _fresh(work / f"run{rep}", lambda d: None)
        runs.append(dict(TIMERS.seconds) | {"= whole save()": wall, "= raw os.write+fsync, same bytes": raw})
        calls |= TIMERS.calls
    title = f"ckptguard blocking save (verify=full), {w.label}, {w.payload_bytes / 1e9:.2f} GB: median of {repeats}"
    _median_table(title, runs, calls, "= whole save()")
    print("\nIndented rows are inside the numbered step; with several files written or verified at once,")
    print("per-thread sums can exceed their step.")


def profile_async(w: Workload, repeats: int, work: Path) -> None:
    """The same breakdown for save(blocking=False) + wait(), after one warm-up save (buffers exist).

    Each save here also prunes the previous checkpoint (keep_last=1), as a training run would.
    """
    from guard import GuardSaver

    saver = GuardSaver(w, work / "async", async_save=True)
    saver.start(0)
    saver.wait()
    runs: list[dict[str, float]] = []
    for step in range(1, repeats + 1):
        TIMERS.reset()
        t0 = time.perf_counter()
        stall = saver.start(step)
        saver.wait()
        runs.append(
            dict(TIMERS.seconds)
            | {"= stall (save returns)": stall, "= save() to wait() done": time.perf_counter() - t0}
        )
        calls = dict(TIMERS.calls)
    saver.close()
    _fresh(work / "async", lambda d: None)
    _median_table(
        f"ckptguard async save + wait, {w.label}: median of {repeats}", runs, calls, "= save() to wait() done"
    )


def _fresh(path: Path, fn: Callable[[Path], object]) -> float:
    """Time fn(path), then remove path and flush the deletion before the next timed step."""
    t0 = time.perf_counter()
    fn(path)
    dt = time.perf_counter() - t0
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workload", choices=("lora", "full"), action="append")
    ap.add_argument("--workdir", type=Path, default=HERE / "results" / "profile-work")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    try:
        for name in args.workload or ["full", "lora"]:
            w = build(name, args.quick)
            profile_ckptguard(w, args.repeats, args.workdir)
            profile_async(w, args.repeats, args.workdir)
            del w
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
