"""Resume discovery among many checkpoints: ckptguard (validates manifests) vs a scan of names only.

The checkpoints are real saves of a tiny state through the manager, so every manifest's step and
hashes are genuine; a copied directory with an edited step would not validate, and should not.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import ckptguard
from baselines import drop_page_cache
from report import Results, Row

SECTION = "resume discovery"
NAME_RE = re.compile(r"^checkpoint-(\d+)$")
NAME_SCAN = "name-only scan (listdir + regex max)"


def name_scan(run_dir: Path) -> int:
    """What tools that trust names do: the highest checkpoint-N, valid or not."""
    steps = [int(m.group(1)) for n in os.listdir(run_dir) if (m := NAME_RE.match(n))]
    return max(steps)


def make_checkpoints(run_dir: Path, count: int) -> float:
    """`count` real checkpoints of a ~100-byte state; returns the seconds it took."""
    state = {"w": torch.nn.Linear(4, 4), "note": "tiny"}
    t0 = time.perf_counter()
    with ckptguard.CheckpointManager(run_dir, create_parents=True) as mgr:
        for step in range(1, count + 1):
            mgr.save(step, state)
    return time.perf_counter() - t0


def _resume_latest(run_dir: Path) -> int:
    """A fresh process's resume: open the manager (preflight + lock), ask for the newest valid."""
    with ckptguard.CheckpointManager(run_dir) as mgr:
        info = mgr.latest()
    return info.step


def _list_all(run_dir: Path) -> int:
    with ckptguard.CheckpointManager(run_dir) as mgr:
        return len(mgr.list())


def _timed_ms(fn, run_dir: Path, cold: bool, expect: int) -> float:
    if cold:
        drop_page_cache()
    t0 = time.perf_counter()
    got = fn(run_dir)
    ms = (time.perf_counter() - t0) * 1000
    if got != expect:
        raise RuntimeError(f"{fn.__name__} returned {got}, expected {expect}")
    return ms


class Maker:
    """Makes the checkpoints in a child process, so it overlaps the memory probes (which measure
    memory, not time) instead of adding its minutes to the run."""

    def __init__(self, run_dir: Path, count: int) -> None:
        shutil.rmtree(run_dir, ignore_errors=True)
        self.run_dir, self.count = run_dir, count
        cmd = [sys.executable, __file__, str(run_dir), str(count)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self) -> float:
        """Seconds the child took; raises RuntimeError if it could not make them."""
        out, err = self._proc.communicate(timeout=900)
        if self._proc.returncode != 0:
            last = (err.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"making checkpoints failed: {last}")
        return float(out.strip().splitlines()[-1])


def resume_section(res: Results, maker: Maker, repeats: int, cold: bool) -> None:
    """Rows for warm (and, where the kernel allows, cold-cache) discovery among the maker's checkpoints."""
    run_dir, count = maker.run_dir, maker.count
    label = f"{count} ckpts"
    names = {
        NAME_SCAN: (name_scan, count),
        "ckptguard open + latest()": (_resume_latest, count),
        "ckptguard open + list() (all validated)": (_list_all, count),
    }
    modes = [("warm", False)] + ([("cold", True)] if cold else [])
    try:
        made = maker.result()
    except Exception as exc:
        for (mode, _), measure in ((m, n) for m in modes for n in names):
            res.add(Row(SECTION, label, f"{measure} ({mode})", "ms", status="failed", note=f"{exc}"))
        return
    for mode, drop in modes:
        rows = {}
        for measure in names:
            base = None if measure == NAME_SCAN else f"{NAME_SCAN} ({mode})"
            row = Row(SECTION, label, f"{measure} ({mode})", "ms", baseline=base, higher_is_better=False)
            rows[measure] = res.add(row)
        for _rep in range(repeats):
            for measure, (fn, expect) in names.items():
                rows[measure].samples.append(_timed_ms(fn, run_dir, drop, expect))
        if drop:
            rows[NAME_SCAN].note = "page cache dropped before each run"
    first = res.find(SECTION, label, f"{NAME_SCAN} (warm)")
    first.note = (
        f"{count} checkpoints made by real saves in {made:.1f} s ({made / count * 1000:.1f} ms each, "
        "while the memory probes ran)"
    )
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    print(make_checkpoints(Path(sys.argv[1]), int(sys.argv[2])))
