"""ckptguard benchmark: one command, one run, same states, same directory.

    make bench                          # full sizes: 0.5 GB LoRA run and a 2 GB full model
    .venv/bin/python bench/run.py --quick   # tiny sizes, 2 repeats: a smoke test of the harness

Writes bench.md (tables, targets met / not met), bench.json (every sample) and bench.png into --out.
Exits 1 if a case failed.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

import memprobe
import resume
import sections as sec
from baselines import drop_page_cache
from report import Results, Row, Target, write_outputs
from workloads import build

HERE = Path(__file__).resolve().parent
MIB_LIMIT_BLOCKING = 64.0
MEM_STATE = "one copy of the state (reference)"
T = TypeVar("T")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="ckptguard save/verify/resume benchmark")
    ap.add_argument("--quick", action="store_true", help="tiny states and 2 repeats (smoke test)")
    ap.add_argument("--repeats", type=int, help="runs per figure (default 5 for LoRA, 3 for the 2 GB state; stall 3)")
    ap.add_argument("--checkpoints", type=int, help="checkpoints for resume discovery (default 1000)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="where bench.md/json/png go")
    ap.add_argument("--workdir", type=Path, help="scratch directory on the disk to measure (default OUT/work)")
    return ap.parse_args(argv)


def environment(args: argparse.Namespace, work: Path, cold: bool) -> dict[str, object]:
    """What the figures depend on, printed above the tables."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    fs = _filesystem(work)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": "quick (tiny sizes, smoke test: figures are not meaningful)" if args.quick else "full",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}), "
        f"{mem:.1f} GiB RAM, kernel {platform.release()}",
        "software": f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}",
        "scratch directory": f"{work} ({fs})",
        "load average at start (1/5/15 min)": _load(),
        "page cache": "dropped before every cold-cache run (echo 3 > /proc/sys/vm/drop_caches)"
        if cold
        else "cannot be dropped here: cold-cache rows skipped; warm figures read from the page cache",
    }


def _load() -> str:
    """Other work on the machine shows here: figures taken under load are noisier and lower."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


def _filesystem(path: Path) -> str:
    """Filesystem type and device of the mount holding `path` (longest matching mount point)."""
    best = ("", "?", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype = line.split()[:3]
        if str(path).startswith(mnt) and len(mnt) >= len(best[0]):
            best = (mnt, fstype, dev)
    return f"{best[1]} on {best[2]}, mounted at {best[0]}"


def memory_section(res: Results, names: list[str], quick: bool, repeats: int, work: Path) -> None:
    """Peak RSS added by a raw write, a blocking and an async save, each method in its own process.

    Probes run two at a time: they measure memory, which does not depend on sharing the CPUs, and
    one at a time they would take minutes of the 10-minute budget. --quick runs every method of
    a state in one process (the figures are not meaningful there anyway).
    """
    jobs: list[tuple[str, list[str], Future[dict]]] = []
    methods = list(memprobe.METHODS)
    groups = [methods] if quick else [[m] for m in methods]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for name in names:
            res.add(Row(memprobe.SECTION, name, MEM_STATE, "MiB", higher_is_better=False))
            for group in groups:
                scratch = work / f"mem-{name}-{group[0]}"
                jobs.append((name, group, pool.submit(memprobe.probe, name, group, quick, repeats, scratch)))
            for method, label in memprobe.METHODS.items():
                base = None if method == "raw" else MEM_STATE
                res.add(Row(memprobe.SECTION, name, label, "MiB", baseline=base, higher_is_better=False))
        for name, group, job in jobs:
            for method in group:
                _memory_row(res, res.find(memprobe.SECTION, name, memprobe.METHODS[method]), method, job)


def _memory_row(res: Results, row: Row, method: str, job: Future[dict]) -> None:
    try:
        outs = job.result()[method]
    except Exception as exc:
        outs = {"error": f"{type(exc).__name__}: {exc}"}
    if isinstance(outs, dict):
        row.status, row.note = "failed", outs["error"]
        return
    row.samples = [float(o["added_mib"]) for o in outs]
    res.find(row.section, row.workload, MEM_STATE).samples = [float(outs[0]["state_mib"])]
    anon = max(float(o["anon_added_mib"]) for o in outs)
    row.note = f"heap (RssAnon) added, sampled every 2 ms: up to {anon:.0f} MiB; baseline RSS "
    row.note += f"{outs[0]['baseline_rss_mib']:.0f} MiB" + ("" if outs[0]["hwm_reset"] else " (HWM not reset)")


def _ratio(res: Results, section: str, workload: str, measure: str) -> float | None:
    row = res.find(section, workload, measure)
    return res.ratio(row) if row else None


def _div(res: Results, section: str, workload: str, num: str, den: str) -> float | None:
    a, b = res.find(section, workload, num), res.find(section, workload, den)
    if a is None or b is None or a.median is None or not b.median:
        return None
    return a.median / b.median


def targets(res: Results, names: list[str]) -> None:
    """The goals of issue 4, each evaluated from this run's medians."""
    mem = memprobe.SECTION
    for w in names:
        t = res.targets
        t.append(
            Target(
                "blocking save with full verify vs raw write+fsync",
                w,
                _ratio(res, sec.SAVE, w, sec.GUARD_BLOCKING),
                0.9,
                ">=",
                "x",
                "GB/s ratio",
            )
        )
        floor = _div(res, sec.STALL, w, sec.MEMCOPY, sec.GUARD_BLOCKING)
        how = "seconds ratio" + (f"; a plain memory copy alone is {floor:.2f}x" if floor is not None else "")
        value = _div(res, sec.STALL, w, sec.GUARD_ASYNC, sec.GUARD_BLOCKING)
        t.append(Target("async stall vs blocking save time", w, value, 0.1, "<=", "x", how))
        for dcp in (sec.DCP_ASYNC_CACHED, sec.DCP_ASYNC):
            t.append(
                Target(
                    f"async stall vs {dcp}",
                    w,
                    _div(res, sec.STALL, w, sec.GUARD_ASYNC, dcp),
                    1.0,
                    "<=",
                    "x",
                    "seconds ratio",
                )
            )
        for mode in ("warm cache", "cold cache"):
            t.append(
                Target(
                    f"verify full vs plain read ({mode})",
                    w,
                    _ratio(res, sec.VERIFY, w, f"ckptguard verify full ({mode})"),
                    0.9,
                    ">=",
                    "x",
                    "GB/s ratio",
                )
            )
        blocking = res.find(mem, w, memprobe.METHODS["guard_blocking"])
        t.append(
            Target(
                "peak memory added by a blocking save",
                w,
                blocking.median if blocking else None,
                MIB_LIMIT_BLOCKING,
                "<=",
                "MiB",
                "VmHWM delta, own process",
            )
        )
        copy = res.find(mem, w, MEM_STATE)
        limit = (copy.median or 0.0) + MIB_LIMIT_BLOCKING if copy else 0.0
        asy = res.find(mem, w, memprobe.METHODS["guard_async"])
        t.append(
            Target(
                "peak memory added by an async save",
                w,
                asy.median if asy else None,
                round(limit),
                "<=",
                "MiB",
                "one copy of the state + the blocking allowance (64 MiB)",
            )
        )


def _phase(label: str, fn: Callable[[], T]) -> T:
    """Run one section and say how long it took (the whole bench must stay under 10 minutes)."""
    t0 = time.perf_counter()
    out = fn()
    print(f"{label} section: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def _one_state(res: Results, name: str, args: argparse.Namespace, work: Path, cold: bool) -> None:
    """Save, stall and verify sections on one state, built here and freed on return."""
    reps = args.repeats or (2 if args.quick else {"lora": 5, "full": 3}[name])
    t0 = time.perf_counter()
    w = build(name, args.quick)
    gb = w.payload_bytes / 1e9
    print(f"[{name}] {w.label}: {gb:.3f} GB built in {time.perf_counter() - t0:.1f} s", flush=True)
    res.env[f"state {name}"] = f"{w.label}, {len(w.flat)} tensors, {gb:.3f} GB"
    saves = _phase(f"[{name}] save", lambda: sec.save_section(res, w, reps, work))
    # 3 at most: under CPU contention one async LoRA save can stall for seconds (see the notes)
    _phase(f"[{name}] stall", lambda: sec.stall_section(res, w, min(reps, 3), work, saves))
    _phase(f"[{name}] verify", lambda: sec.verify_section(res, w, reps, work, cold))


def run(args: argparse.Namespace) -> Results:
    """Every section on every state, in one process (memory probes in their own)."""
    work = (args.workdir or args.out / "work").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cold = drop_page_cache()
    res = Results(env=environment(args, work, cold))
    names = ["lora", "full"]
    for name in names:
        _one_state(res, name, args, work, cold)
        gc.collect()
    maker = resume.Maker(work / "many", args.checkpoints or (20 if args.quick else 1000))
    _phase("memory", lambda: memory_section(res, names, args.quick, 2 if args.quick else 3, work))
    _phase("resume", lambda: resume.resume_section(res, maker, 2 if args.quick else 5, cold))
    shutil.rmtree(work, ignore_errors=True)
    targets(res, names)
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    res = run(args)
    res.env["load average at end (1/5/15 min)"] = _load()
    res.env["wall time of this run"] = f"{time.perf_counter() - t0:.0f} s"
    write_outputs(res, args.out)
    print((args.out / "bench.md").read_text())
    failed = [r for r in res.rows if r.status == "failed"]
    for r in failed:
        print(f"FAILED: {r.section} / {r.workload} / {r.measure}: {r.note}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
