"""``ckptguard ls | verify | doctor | prune | report`` (and ``train`` / ``export`` from the trainer).

Human tables by default, ``--json`` for scripts. Exit codes scripts can rely on:
0 everything is fine; 1 a check failed (invalid checkpoint, doctor found a problem); 2 bad usage
or input (missing path, a CheckpointError before anything could be checked).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptguard import commit, discovery, preflight, retention
from ckptguard.errors import CheckpointError
from ckptguard.events import read_events
from ckptguard.manifest import MANIFEST_NAME, step_from_name
from ckptguard.verify import LEVELS, verify_checkpoint

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def format_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _run_policy(run_dir: Path) -> tuple[retention.RetentionPolicy, frozenset[str]]:
    """The retention policy and resumed-from checkpoint the run last recorded in events.jsonl."""
    policy, protected = retention.RetentionPolicy(), frozenset()
    for event in read_events(run_dir):
        if event.get("event") == "preflight" and isinstance(event.get("policy"), dict):
            try:
                policy = retention.RetentionPolicy(**event["policy"])
            except (TypeError, ValueError):
                continue
        elif event.get("event") == "resume" and isinstance(event.get("path"), str):
            protected = frozenset({Path(event["path"]).name})
    return policy, protected


LS_HEADER = ["  NAME", "STEP", "STATUS", "SIZE", "METRICS", "KEPT BECAUSE"]


def keep_reasons(run_dir: Path, found: list[discovery.CheckpointInfo]) -> dict[str, list[str]]:
    """Why the run's own retention policy keeps each valid checkpoint (an empty list: it would prune it)."""
    policy, protected = _run_policy(run_dir)
    return retention.plan(
        [retention.Candidate(c.name, c.step, c.sequence, c.metrics) for c in found if c.valid],
        policy,
        protected,
    )


def ls_rows(found: list[discovery.CheckpointInfo], keep: dict[str, list[str]], latest: str | None) -> list[list[str]]:
    """The rows of `ckptguard ls` (under LS_HEADER); the run report shows the same table."""
    rows = []
    for c in found:
        status = "valid" if c.valid else f"INVALID: {c.reason}"
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(c.metrics.items()))
        why = ", ".join(keep.get(c.name, [])) if c.valid else "never loaded"
        rows.append(
            [("* " if c.name == latest else "  ") + c.name, str(c.step), status, format_size(c.bytes), metrics, why]
        )
    return rows


def cmd_ls(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"error: {run_dir} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    found = discovery.discover(run_dir)
    keep = keep_reasons(run_dir, found)
    latest = commit.read_latest(run_dir)
    if args.json:
        print(
            json.dumps(
                {
                    "run_dir": str(run_dir.absolute()),
                    "latest": latest,
                    "checkpoints": [
                        {
                            "name": c.name,
                            "step": c.step,
                            "valid": c.valid,
                            "reason": c.reason,
                            "bytes": c.bytes,
                            "metrics": c.metrics,
                            "sequence": c.sequence,
                            "keep_reasons": keep.get(c.name, []),
                        }
                        for c in found
                    ],
                },
                indent=2,
            )
        )
        return EXIT_OK
    if not found:
        print(f"{run_dir}: no checkpoints")
        return EXIT_OK
    print(_table(ls_rows(found, keep, latest), LS_HEADER))
    print("(* = LATEST)")
    return EXIT_OK


def _targets(path: Path) -> list[Path]:
    """A checkpoint directory itself, or every checkpoint-* directory of a run directory."""
    if (path / MANIFEST_NAME).exists() or step_from_name(path.name) is not None:
        return [path]
    return [c.path for c in discovery.discover(path)] or [path]


def cmd_verify(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return EXIT_USAGE
    reports = [verify_checkpoint(p, args.level) for p in _targets(path)]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "path": str(r.path),
                        "level": r.level,
                        "ok": r.ok,
                        "bytes": r.bytes_read,
                        "seconds": round(r.seconds, 4),
                        "problems": [{"file": p.file, "reason": p.reason} for p in r.problems],
                    }
                    for r in reports
                ],
                indent=2,
            )
        )
    else:
        for r in reports:
            if r.ok:
                rate = r.bytes_read / r.seconds / 2**20 if r.seconds and r.bytes_read else 0
                print(f"OK       {r.path} ({r.level}, {format_size(r.bytes_read)} checked, {rate:.0f} MiB/s)")
            else:
                print(f"INVALID  {r.path} ({r.level})")
                for p in r.problems:
                    print(f"         {p.file}: {p.reason}")
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAILED


def cmd_doctor(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).absolute()
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": ok, "detail": detail})

    where = run_dir if run_dir.is_dir() else run_dir.parent
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
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), "ok": all(c["ok"] for c in checks), "checks": checks}, indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c['ok'] else 'FAIL'}  {c['check']:<12} {c['detail']}")
    return EXIT_OK if all(c["ok"] for c in checks) else EXIT_FAILED


def _doctor_space(run_dir: Path, facts: preflight.FilesystemFacts, check: Any) -> None:
    found = discovery.discover(run_dir) if run_dir.is_dir() else []
    sizes = [c.bytes for c in found if c.valid]
    detail = (
        f"{format_size(facts.free_bytes)} free of {format_size(facts.total_bytes)}, {facts.free_inodes} inodes free"
    )
    if not sizes:
        check("space", facts.free_bytes > 0, detail)
        return
    policy, _ = _run_policy(run_dir)
    try:
        preflight.check_space_for_run(run_dir, max(sizes), policy.slots, sum(sizes))
    except CheckpointError as exc:
        check("space", False, f"{detail}; {exc.message}")
        return
    check("space", True, f"{detail}; enough for the next saves of about {format_size(max(sizes))} each")


def _doctor_run(run_dir: Path, check: Any) -> None:
    lock = preflight.RunLock(run_dir)
    try:
        lock.acquire()
        lock.release()
        check("lock", True, "no other process holds the run directory")
    except CheckpointError:
        check("lock", True, f"held by a running writer ({lock.holder()}); saves from a second writer would fail")
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith((commit.STAGING_PREFIX, commit.TRASH_PREFIX))]
    check(
        "leftovers",
        True,
        f"{len(leftovers)} unfinished save(s), removed at the next start" if leftovers else "no unfinished saves",
    )
    found = discovery.discover(run_dir)
    invalid = [c for c in found if not c.valid]
    check(
        "checkpoints",
        not invalid,
        f"{len(found) - len(invalid)} valid, {len(invalid)} invalid"
        + "".join(f"; {c.name}: {c.reason}" for c in invalid[:3]),
    )
    latest = commit.read_latest(run_dir)
    newest = discovery.newest_first(found)
    consistent = newest[0].name == latest if newest else True
    check(
        "LATEST",
        consistent,
        f"LATEST -> {latest}; newest valid is {newest[0].name if newest else 'none'}",
    )


def cmd_prune(args: argparse.Namespace) -> int:
    from ckptguard.manager import CheckpointManager

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"error: {run_dir} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    policy_args = dict(
        keep_last=args.keep_last,
        keep_best=args.keep_best,
        metric=args.metric,
        mode=args.mode,
        keep_every=args.keep_every,
    )
    if args.dry_run:
        found = discovery.discover(run_dir)
        _, protected = _run_policy(run_dir)
        keep = retention.plan(
            [retention.Candidate(c.name, c.step, c.sequence, c.metrics) for c in found if c.valid],
            retention.RetentionPolicy(**policy_args),
            protected,
        )
        doomed = [c for c in found if c.valid and not keep[c.name]]
    else:
        with CheckpointManager(run_dir, **policy_args) as mgr:
            doomed = mgr.prune()
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "removed": [c.name for c in doomed]}, indent=2))
    else:
        verb = "would remove" if args.dry_run else "removed"
        for c in doomed:
            print(f"{verb} {c.name} ({format_size(c.bytes)})")
        print(f"{verb} {len(doomed)} checkpoint(s)")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from ckptguard.report import write_report  # matplotlib loads only for this command

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"error: {run_dir} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = write_report(run_dir, args.out)
    except OSError as exc:
        print(f"error: cannot write the report to {exc.filename or args.out}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    print(path)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckptguard", description="Checkpoints that never fail silently.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="list checkpoints: step, status, size, metrics, why kept")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("verify", help="exit 0 only if every byte is what was written")
    p.add_argument("path", help="a checkpoint directory, or a run directory to verify all of its checkpoints")
    p.add_argument("--level", choices=LEVELS, default="full")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("doctor", help="can a run save here? permissions, space, filesystem, lock")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("prune", help="delete checkpoints a retention policy does not keep")
    p.add_argument("run_dir")
    p.add_argument("--keep-last", type=int, default=None)
    p.add_argument("--keep-best", type=int, default=0)
    p.add_argument("--metric", default=None)
    p.add_argument("--mode", choices=("min", "max"), default="min")
    p.add_argument("--keep-every", type=int, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("report", help="one self-contained HTML page: losses, checkpoint timeline, disk use")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="where to write the page (default: RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)
    from ckptguard.train.commands import register

    register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CheckpointError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
