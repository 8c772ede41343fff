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
from ckptguard.errors import CheckpointError
from ckptguard.format.layout import VERIFY_LEVELS
from ckptguard.units import format_bytes

if TYPE_CHECKING:
    pass

# The store's modules import torch (seconds): each command imports what it uses, so `ckptguard train`
# watches its signals before torch loads, and `--help` answers at once.

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def cmd_ls(args: argparse.Namespace) -> int:
    from ckptguard.catalog import listing as rows
    from ckptguard.run import location

    try:
        found = location.open_location(args.run_dir).ls()
    except location.Unusable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(found.doc, indent=2))
    elif not found.found and not found.aside:
        print(f"{found.where}: no checkpoints")
    else:
        print(_table(rows.ls_rows(found.found, found.keep, found.latest, found.aside), rows.LS_HEADER))
        if isinstance(found.doc.get("run_dir"), str):  # a bucket has no LATEST and nothing set aside
            hint = "; `ckptguard prune --superseded` removes superseded directories" if found.aside else ""
            print("(* = LATEST)" + hint)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from ckptguard.run import location

    try:
        reports = location.open_location(args.path).verify(args.level)
    except location.Unusable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
    """Can a run save here? Nothing is left behind (run/doctor.py, run/location.py say how)."""
    from ckptguard.run import location

    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": ok, "detail": detail})

    where = location.open_location(args.run_dir)
    where.doctor(check)
    shown = str(where.path.absolute()) if isinstance(where, location.LocalRun) else args.run_dir
    return _doctor_out(args, shown, checks)


def _doctor_out(args: argparse.Namespace, run_dir: str, checks: list[dict[str, Any]]) -> int:
    if args.json:
        print(json.dumps({"run_dir": run_dir, "ok": all(c["ok"] for c in checks), "checks": checks}, indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c['ok'] else 'FAIL'}  {c['check']:<12} {c['detail']}")
    return EXIT_OK if all(c["ok"] for c in checks) else EXIT_FAILED


def cmd_prune(args: argparse.Namespace) -> int:
    from ckptguard.run import location

    policy = retention.RetentionPolicy(
        keep_last=args.keep_last, keep_best=args.keep_best, metric=args.metric, mode=args.mode,
        keep_every=args.keep_every,
    )  # fmt: skip
    try:
        pruned = location.open_location(args.run_dir).prune(policy, dry_run=args.dry_run, superseded=args.superseded)
    except location.Unusable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    doomed, aside = pruned.doomed, pruned.aside
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
