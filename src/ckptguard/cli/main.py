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
from typing import TYPE_CHECKING, Any

from ckptguard.catalog import retention
from ckptguard.catalog.checkpoint import newest_first
from ckptguard.errors import CheckpointError
from ckptguard.format.layout import MANIFEST_NAME, STAGING_PREFIX, TRASH_PREFIX, VERIFY_LEVELS, step_from_name
from ckptguard.s3.objectstore import is_remote
from ckptguard.units import format_bytes

if TYPE_CHECKING:
    from ckptguard.run import preflight

# The store's modules import torch (seconds): each command imports what it uses, so `ckptguard train`
# watches its signals before torch loads, and `--help` answers at once.

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def cmd_ls(args: argparse.Namespace) -> int:
    from ckptguard.catalog import discovery, listing
    from ckptguard.commit import publish

    if is_remote(args.run_dir):
        return _ls_remote(args)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"error: {run_dir} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    found = discovery.discover(run_dir)
    keep = listing.keep_reasons(run_dir, found)
    latest = publish.read_latest(run_dir)
    aside = discovery.set_aside(run_dir)
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
                    "set_aside": [{"name": a.name, "step": a.step, "kind": a.kind} for a in aside],
                },
                indent=2,
            )
        )
        return EXIT_OK
    if not found and not aside:
        print(f"{run_dir}: no checkpoints")
        return EXIT_OK
    print(_table(listing.ls_rows(found, keep, latest, aside), listing.LS_HEADER))
    print("(* = LATEST)" + ("; `ckptguard prune --superseded` removes superseded directories" if aside else ""))
    return EXIT_OK


def _ls_remote(args: argparse.Namespace) -> int:
    """`ls` of a remote run: committed checkpoints are valid; an upload without its marker is not."""
    from ckptguard.catalog import listing
    from ckptguard.run import location

    found, doc = location.ls_json(args.run_dir)
    if args.json:
        print(json.dumps(doc, indent=2))
    elif not found:
        print(f"{doc['url']}: no checkpoints")
    else:
        keep = retention.plan(found, retention.RetentionPolicy())
        print(_table(listing.ls_rows(found, keep, None), listing.LS_HEADER))  # type: ignore[arg-type]
    return EXIT_OK


def _targets(path: Path) -> list[Path]:
    """A checkpoint directory itself, or every checkpoint-* directory of a run directory."""
    from ckptguard.catalog import discovery

    if (path / MANIFEST_NAME).exists() or step_from_name(path.name) is not None:
        return [path]
    return [c.path for c in discovery.discover(path)] or [path]


def cmd_verify(args: argparse.Namespace) -> int:
    from ckptguard.catalog.verify import verify_checkpoint
    from ckptguard.run import location

    path = Path(args.path)
    if is_remote(args.path):
        reports: list[Any] = location.verify_reports(args.path, args.level)
    elif not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        print(f"error: {path} {what}; give a checkpoint directory or a run directory", file=sys.stderr)
        return EXIT_USAGE
    else:
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
                read = f", {format_bytes(r.bytes_read)} read at {r.bytes_read / r.seconds / 2**20:.0f} MiB/s"
                print(f"OK       {r.path} ({r.level}{read if r.bytes_read and r.seconds else ''})")
            else:
                print(f"INVALID  {r.path} ({r.level})")
                for p in r.problems:
                    print(f"         {p.file}: {p.reason}")
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAILED


def cmd_doctor(args: argparse.Namespace) -> int:
    """Can a run save here? Leaves the directory as it found it: the write probe removes what it made,
    the lock is tested without creating a lock file, and nothing is probed inside a checkpoint."""
    from ckptguard.run import location, preflight

    run_dir = Path(args.run_dir).absolute()
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": ok, "detail": detail})

    if is_remote(args.run_dir):
        location.doctor(args.run_dir, check)
        return _doctor_out(args, args.run_dir, checks)
    where = run_dir if run_dir.is_dir() else run_dir.parent
    try:
        preflight.refuse_inside_checkpoint(run_dir)
    except CheckpointError as exc:
        check("directory", False, f"{exc.message}; {exc.remedy}")
    else:
        _doctor_dir(run_dir, where, check)
    return _doctor_out(args, str(run_dir), checks)


def _doctor_out(args: argparse.Namespace, run_dir: str, checks: list[dict[str, Any]]) -> int:
    if args.json:
        print(json.dumps({"run_dir": run_dir, "ok": all(c["ok"] for c in checks), "checks": checks}, indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c['ok'] else 'FAIL'}  {c['check']:<12} {c['detail']}")
    return EXIT_OK if all(c["ok"] for c in checks) else EXIT_FAILED


def _doctor_dir(run_dir: Path, where: Path, check: Any) -> None:
    from ckptguard.run import preflight

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
    from ckptguard.catalog import discovery, listing
    from ckptguard.run import preflight

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
    from ckptguard.catalog import discovery, listing
    from ckptguard.commit import publish
    from ckptguard.run import preflight

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
    check(
        "LATEST",
        consistent,
        f"LATEST -> {latest}; newest valid is {newest[0].name if newest else 'none'}",
    )


def cmd_prune(args: argparse.Namespace) -> int:
    from ckptguard.catalog import discovery, listing
    from ckptguard.run import location
    from ckptguard.run.manager import CheckpointManager

    run_dir = Path(args.run_dir)
    if not is_remote(args.run_dir) and not run_dir.is_dir():
        print(f"error: {run_dir} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    policy_args = dict(
        keep_last=args.keep_last,
        keep_best=args.keep_best,
        metric=args.metric,
        mode=args.mode,
        keep_every=args.keep_every,
    )
    superseded = args.superseded and not is_remote(args.run_dir)  # a bucket has no set-aside directories
    aside = [a for a in discovery.set_aside(run_dir) if a.kind == "superseded"] if superseded else []
    if is_remote(args.run_dir):
        doomed: list[Any] = location.prune(args.run_dir, retention.RetentionPolicy(**policy_args), dry_run=args.dry_run)
    elif args.dry_run:
        found = discovery.discover(run_dir)
        _, protected = listing.run_policy(run_dir)
        doomed = retention.doomed(found, retention.RetentionPolicy(**policy_args), protected)
    else:
        with CheckpointManager(run_dir, **policy_args) as mgr:
            doomed = mgr.prune()
            aside = mgr.prune_superseded() if args.superseded else []
    if args.json:
        removed = [c.name for c in doomed] + [a.name for a in aside]
        print(json.dumps({"dry_run": args.dry_run, "removed": removed}, indent=2))
    else:
        verb = "would remove" if args.dry_run else "removed"
        for c in doomed:
            print(f"{verb} {c.name} ({format_bytes(c.bytes)})")
        for a in aside:
            print(f"{verb} {a.name} (superseded)")
        print(f"{verb} {len(doomed)} checkpoint(s)" + (f" and {len(aside)} superseded directory(ies)" if aside else ""))
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
    p.add_argument("run_dir", help="a run directory, or an s3://bucket/prefix URL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("verify", help="exit 0 only if every byte is what was written")
    p.add_argument("path", help="a checkpoint or run directory (all its checkpoints), or the s3:// URL of either")
    p.add_argument("--level", choices=VERIFY_LEVELS, default="full")
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
    p.add_argument("--superseded", action="store_true", help="also remove directories set aside as superseded")
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
