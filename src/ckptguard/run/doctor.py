"""``ckptguard doctor`` on a local run directory: can a run save here?

It leaves the directory as it found it: the write probe removes what it made, the lock is tested
without creating a lock file, and nothing is probed inside a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptguard.catalog import discovery, listing
from ckptguard.catalog.checkpoint import newest_first
from ckptguard.commit import publish
from ckptguard.errors import CheckpointError
from ckptguard.format.layout import STAGING_PREFIX, TRASH_PREFIX
from ckptguard.run import preflight
from ckptguard.units import format_bytes


def check_directory(run_dir: Path, check: Any) -> None:
    """Every check of a local `run_dir` (absolute), each reported through `check(name, ok, detail)`."""
    where = run_dir if run_dir.is_dir() else run_dir.parent
    try:
        preflight.refuse_inside_checkpoint(run_dir)
    except CheckpointError as exc:
        check("directory", False, f"{exc.message}; {exc.remedy}")
    else:
        _doctor_dir(run_dir, where, check)


def _doctor_dir(run_dir: Path, where: Path, check: Any) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        check("directory", False, f"{run_dir} is a file, not a directory")
    elif not where.is_dir():
        check("directory", False, f"neither {run_dir} nor its parent exists")
    else:
        check("directory", True, f"{run_dir} {'exists' if run_dir.is_dir() else 'will be created'}")
        try:
            preflight.probe_writable(where)
            check("write probe", True, f"created, wrote, fsynced, renamed and read back a file in {where}")
        except CheckpointError as exc:
            check("write probe", False, str(exc))
        facts = preflight.filesystem_facts(where)
        fs_detail = f"{facts.fstype} mounted at {facts.mount_point}" + "".join(f"; {w}" for w in facts.warnings)
        check("filesystem", not facts.read_only, fs_detail + ("; READ-ONLY" if facts.read_only else ""))
        _doctor_space(run_dir, facts, check)
        if run_dir.is_dir():
            _doctor_run(run_dir, check)


def _doctor_space(run_dir: Path, facts: preflight.FilesystemFacts, check: Any) -> None:
    found = discovery.discover(run_dir) if run_dir.is_dir() else []
    sizes = [c.bytes for c in found if c.valid]
    detail = (
        f"{format_bytes(facts.free_bytes)} free of {format_bytes(facts.total_bytes)}, {facts.free_inodes} inodes free"
    )
    if not sizes:
        check("space", facts.free_bytes > 0, detail)
        return
    policy, _ = listing.run_policy(run_dir)
    try:
        preflight.check_space_for_run(run_dir, max(sizes), policy.slots, sum(sizes))
    except CheckpointError as exc:
        check("space", False, f"{detail}; {exc.message}")
        return
    check("space", True, f"{detail}; enough for the next saves of about {format_bytes(max(sizes))} each")


def _doctor_run(run_dir: Path, check: Any) -> None:
    lock = preflight.RunLock(run_dir)
    if lock.held_elsewhere():
        check("lock", True, f"held by a running writer ({lock.holder()}); saves from a second writer would fail")
    else:
        check("lock", True, "no other process holds the run directory")
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith((STAGING_PREFIX, TRASH_PREFIX))]
    check(
        "leftovers",
        True,
        f"{len(leftovers)} unfinished save(s), removed at the next start" if leftovers else "no unfinished saves",
    )
    found = discovery.discover(run_dir)
    check("checkpoints", *listing.checkpoints_check(found, "valid", "invalid"))
    latest = publish.read_latest(run_dir)
    newest = newest_first(found)
    consistent = newest[0].name == latest if newest else True
    if latest is None and newest and newest[0].path.is_file():  # checkpoint files (Lightning's): no LATEST
        consistent, latest = True, "none kept (checkpoint files)"
    check(
        "LATEST",
        consistent,
        f"LATEST -> {latest}; newest valid is {newest[0].name if newest else 'none'}",
    )
