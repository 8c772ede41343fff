"""The in-process sections: save throughput, training stall per save, verification throughput.

Cases of a section run round-robin (rep 1 of every case, then rep 2, ...) so a slow drift of the
machine (page cache, background writeback, thermal) spreads over all cases instead of biasing one.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import baselines as bl
from guard import GuardSaver, verify_full
from report import Results, Row
from workloads import Workload

Case = Callable[[Path], float]  # given a path that does not exist yet, returns the seconds measured

SAVE = "save throughput"
STALL = "training stall per save"
VERIFY = "verification throughput"

RAW = "raw os.write+fsync"
GUARD_BLOCKING = "ckptguard save (blocking, full verify)"
GUARD_ASYNC = "ckptguard save(blocking=False) returns"
MEMCOPY = "plain memory copy of the state"
RAW_SAME = "raw os.write+fsync of the state"
DCP_ASYNC = "DCP async_save returns (default)"
DCP_ASYNC_CACHED = "DCP async_save returns (reused staging)"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def round_robin(cases: dict[str, Case], repeats: int, work: Path) -> dict[str, list[float] | Exception]:
    """Run each case `repeats` times, interleaved; a case that raises stops and keeps its error."""
    out: dict[str, list[float] | Exception] = {name: [] for name in cases}
    for rep, (name, case) in itertools.product(range(repeats), cases.items()):
        if isinstance(out[name], Exception):
            continue
        target = work / f"{name.split()[0].replace('/', '_')}-{rep}"
        try:
            out[name].append(case(target))  # type: ignore[union-attr]
        except Exception as exc:  # recorded in the report; one broken case must not hide the others
            out[name] = exc
        finally:
            shutil.rmtree(target, ignore_errors=True)
            os.sync()  # the deletion's journal commit and discards land now, not in the next timed case
    return out


def add_rows(
    res: Results,
    section: str,
    w: Workload,
    measured: dict[str, list[float] | Exception],
    spec: dict[str, dict[str, Any]],
) -> None:
    """Turn round_robin output into rows; spec[measure] gives unit/baseline/higher_is_better/note."""
    for measure, samples in measured.items():
        row = Row(section=section, workload=w.name, measure=measure, **spec[measure])
        if isinstance(samples, Exception):
            row.status, row.note = "failed", f"{type(samples).__name__}: {samples}"
        else:
            row.samples = samples
        res.add(row)


def save_section(res: Results, w: Workload, repeats: int, work: Path) -> dict[str, list[float] | Exception]:
    """GB/s of each saver on the same state; returns every saver's seconds for the stall section."""

    def saver(fn: Callable[[Workload, Path], None]) -> Case:
        return lambda d: timed(lambda: fn(w, d))

    def guard(d: Path) -> float:
        s = GuardSaver(w, d)
        try:
            return timed(lambda: s.save(1))
        finally:
            s.close()

    cases = {RAW: saver(bl.raw_write), "torch.save+fsync": saver(bl.torch_save)}
    cases["safetensors save_file+fsync"] = saver(bl.safetensors_save)
    if w.peft_model is not None:
        cases["PEFT save_pretrained+fsync (adapter only)"] = saver(bl.peft_save)
    cases["DCP save (no_dist)"] = saver(bl.dcp_save)
    cases[GUARD_BLOCKING] = guard
    seconds = round_robin(cases, repeats, work)
    gbps: dict[str, list[float] | Exception] = {}
    for name, s in seconds.items():
        nbytes = w.adapter_bytes if name.startswith("PEFT") else w.payload_bytes
        gbps[name] = s if isinstance(s, Exception) else [nbytes / t / 1e9 for t in s]
    spec = {name: {"unit": "GB/s"} for name in cases}
    spec[GUARD_BLOCKING] = {"unit": "GB/s", "baseline": RAW}
    add_rows(res, SAVE, w, gbps, spec)
    return seconds


def stall_section(
    res: Results, w: Workload, repeats: int, work: Path, saves: dict[str, list[float] | Exception]
) -> None:
    """Seconds until control returns to the training loop, per save (blocking: the whole save)."""
    copy = bl.StateCopy(w)
    dcp_default, dcp_cached = bl.DcpAsync(cached=False), bl.DcpAsync(cached=True)
    run_dir = work / "guard-async"
    steps = itertools.count(1)
    durable: list[float] = []
    guard: GuardSaver | Exception
    try:
        guard = GuardSaver(w, run_dir, async_save=True)
        guard.start(next(steps))  # first call allocates the staging buffers; steady state is measured
        guard.wait()
    except Exception as exc:
        guard = exc

    def guard_case(_d: Path) -> float:
        if isinstance(guard, Exception):
            raise guard
        t0 = time.perf_counter()
        stall = guard.start(next(steps))
        guard.wait()
        durable.append(time.perf_counter() - t0)
        return stall

    def dcp_case(dcp: bl.DcpAsync) -> Case:
        def case(d: Path) -> float:
            stall = timed(lambda: dcp.start(w, d))
            dcp.wait()
            return stall

        return case

    for dcp in (dcp_default, dcp_cached):  # warm-up: same treatment as ckptguard's first save
        dcp_case(dcp)(work / "dcp-warmup")
        shutil.rmtree(work / "dcp-warmup", ignore_errors=True)
    cases = {MEMCOPY: lambda _d: timed(copy.run), GUARD_ASYNC: guard_case}
    cases |= {DCP_ASYNC: dcp_case(dcp_default), DCP_ASYNC_CACHED: dcp_case(dcp_cached)}
    measured = round_robin(cases, repeats, work)
    measured[RAW_SAME] = saves[RAW]
    measured[GUARD_BLOCKING] = saves[GUARD_BLOCKING]
    spec = {name: {"unit": "s", "higher_is_better": False} for name in measured}
    spec[GUARD_ASYNC] |= {"baseline": MEMCOPY}
    if durable:
        spec[GUARD_ASYNC]["note"] = f"median {statistics.median(durable):.2f} s from save() to verified commit"
    spec[GUARD_BLOCKING] |= {"baseline": RAW_SAME}
    spec[RAW_SAME]["note"] = "the save section's raw write, in seconds: the least a blocking save can stall"
    spec[MEMCOPY]["note"] = "one memcpy per tensor (numpy) into buffers allocated and touched once: the lower limit"
    add_rows(res, STALL, w, measured, spec)
    for dcp in (dcp_default, dcp_cached):
        dcp.close()
    if not isinstance(guard, Exception):
        guard.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def verify_section(res: Results, w: Workload, repeats: int, work: Path, cold: bool) -> None:
    """GB/s of verify_checkpoint(level="full") against a plain read of the same files.

    Warm: files in the page cache (right after they were written). Cold: page cache dropped before
    every timed read, so the disk is read; skipped where the kernel refuses drop_caches.
    """
    if not cold:
        for measure in ("plain read (cold cache)", "ckptguard verify full (cold cache)"):
            note = "cannot drop the page cache here (/proc/sys/vm/drop_caches not writable)"
            res.add(Row(VERIFY, w.name, measure, "GB/s", status="skipped", note=note))
    run_dir = work / "verify-run"
    try:
        saver = GuardSaver(w, run_dir)
        path = Path(saver.save(1).path)
        saver.close()
    except Exception as exc:
        verify_unavailable(res, w, exc, cold)
        return
    nbytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    bl.read_files(path)  # warm the cache for the warm cases

    def case(fn: Callable[[], object], drop: bool) -> Case:
        def run(_d: Path) -> float:
            if drop:
                bl.drop_page_cache()
            return nbytes / timed(fn) / 1e9

        return run

    modes = [("warm cache", False)] + ([("cold cache", True)] if cold else [])
    cases: dict[str, Case] = {}
    spec: dict[str, dict] = {}
    for mode, drop in modes:
        read, ver = f"plain read ({mode})", f"ckptguard verify full ({mode})"
        cases[read] = case(lambda: bl.read_files(path), drop)
        cases[ver] = case(lambda: verify_full(path), drop)
        spec |= {read: {"unit": "GB/s"}, ver: {"unit": "GB/s", "baseline": read}}
    add_rows(res, VERIFY, w, round_robin(cases, repeats, work), spec)
    shutil.rmtree(run_dir, ignore_errors=True)


def verify_unavailable(res: Results, w: Workload, exc: Exception, cold: bool) -> None:
    """Rows for the verify section when no ckptguard checkpoint could be made."""
    for mode in ["warm cache"] + (["cold cache"] if cold else []):
        for measure in (f"plain read ({mode})", f"ckptguard verify full ({mode})"):
            res.add(Row(VERIFY, w.name, measure, "GB/s", status="failed", note=f"{type(exc).__name__}: {exc}"))
