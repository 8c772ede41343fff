"""Peak resident memory a save adds, each measured in a fresh process of its own.

The child builds the state, does one save of the tiny (--quick) state of the same kind so that
imports and first-use code pages are already resident. Then, per repeat: a fresh manager, freed
heap returned to the kernel (malloc_trim), the kernel's high-water mark reset
(`echo 5 > /proc/self/clear_refs`), VmRSS recorded as the baseline, one save (async: save, then
wait), and VmHWM - baseline reported. Each async save is its manager's first, so its staging
buffers count in full.

run.py gives each method a process of its own (in --quick, one process per state, to save the
imports). By hand: `python bench/memprobe.py --workload lora --methods guard_async --dir /tmp/x`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

METHODS = {
    "raw": "raw os.write+fsync",
    "guard_blocking": "ckptguard blocking save",
    "guard_async": "ckptguard async save",
}
SECTION = "peak memory added"
# A fixed mmap threshold: glibc otherwise raises it after the first large free, and later large
# buffers come from a thread arena's top that malloc_trim does not return, hiding them from the
# peak of every save but the first. Fixed, every save's buffers show, as a first save's do.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _status_mib() -> dict[str, float]:
    text = Path("/proc/self/status").read_text()
    return {k: int(v) / 1024 for k, v in re.findall(r"^(VmRSS|VmHWM|RssAnon|RssFile):\s+(\d+) kB", text, re.M)}


class _AnonSampler(threading.Thread):
    """Samples RssAnon every 2 ms: tells heap growth apart from file pages the save maps in."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _status_mib()["RssAnon"]
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.002):
            self.peak = max(self.peak, _status_mib()["RssAnon"])

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return self.peak


def _save_once(workload: Any, method: str, run_dir: Path) -> Callable[[], object]:
    """Prepare one save of `workload` by `method` in run_dir; returns a callable that does it."""
    import baselines as bl
    from guard import GuardSaver

    if method == "raw":
        run_dir.mkdir(parents=True)
        return lambda: bl.raw_write(workload, run_dir / "raw")
    saver = GuardSaver(workload, run_dir, async_save=method == "guard_async")
    if method == "guard_async":
        return lambda: (saver.start(1), saver.wait(), saver.close())
    return lambda: (saver.save(1), saver.close())


def _release_free_heap() -> None:
    """Give freed heap pages back to the kernel, so a later save's allocations show in its peak."""
    import ctypes

    # not glibc: nothing to trim, and the figure is still an upper bound
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _measure(save: Callable[[], object], state_bytes: int) -> dict[str, float | bool]:
    gc.collect()
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        reset = True
    except OSError:
        reset = False
    base = _status_mib()
    sampler = _AnonSampler()
    sampler.start()
    save()
    anon_peak = sampler.stop()
    after = _status_mib()
    baseline = base["VmRSS"] if reset else base["VmHWM"]
    return {
        "baseline_rss_mib": baseline,
        "added_mib": after["VmHWM"] - baseline,
        "anon_added_mib": anon_peak - base["RssAnon"],
        "state_mib": state_bytes / 2**20,
        "hwm_reset": reset,
    }


def child(workload_name: str, methods: list[str], quick: bool, repeats: int, work: Path) -> dict[str, Any]:
    """Runs in the probe process: per method, `repeats` saves, each with a fresh manager.

    Returns {method: [MiB figures per save]} or {method: {"error": ...}}.
    """
    from workloads import build

    tiny, w = build(workload_name, quick=True), build(workload_name, quick)
    out: dict[str, Any] = {}
    for method in methods:
        try:
            _save_once(tiny, method, work / "warmup")()
            shutil.rmtree(work / "warmup")
            out[method] = []
            for rep in range(repeats):
                save = _save_once(w, method, work / f"run{rep}")  # manager construction (preflight) not counted
                out[method].append(_measure(save, w.payload_bytes))
                del save
                shutil.rmtree(work / f"run{rep}")
        except Exception as exc:
            out[method] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def probe(workload_name: str, methods: list[str], quick: bool, repeats: int, work: Path) -> dict[str, Any]:
    """Run the methods' saves in a fresh interpreter (the parent's memory must not count)."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--workload", workload_name, "--methods", ",".join(methods)]
    cmd += ["--dir", str(work), "--repeats", str(repeats)] + (["--quick"] if quick else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ | _MALLOC_ENV)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"probe exited {proc.returncode}: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=("lora", "full"), required=True)
    ap.add_argument("--methods", required=True, help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        ap.error(f"unknown methods {sorted(unknown)}")
    print(json.dumps(child(args.workload, methods, args.quick, args.repeats, args.dir)))


if __name__ == "__main__":
    main()
