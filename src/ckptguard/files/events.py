"""events.jsonl: one JSON line per save, verify, prune, resume and failure, with bytes and seconds.

Appended with a single ``write`` on an O_APPEND descriptor, so concurrent writers (a background save
and the main thread) never interleave inside a line. It is a log, not a source of truth: resume
never reads it, so it is not fsynced per line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckptguard.errors import CheckpointError
from ckptguard.format.layout import EVENTS_NAME
from ckptguard.format.manifest import ManifestError, parse_json

log = logging.getLogger("ckptguard")


class EventLog:
    """Appends events for one run directory; `enabled=False` (non-zero ranks) makes it a no-op."""

    def __init__(self, run_dir: Path, *, rank: int = 0, enabled: bool = True) -> None:
        self.path = run_dir / EVENTS_NAME
        self.rank = rank
        self.enabled = enabled
        self._host = socket.gethostname()
        if enabled:
            self._end_torn_line()

    def _end_torn_line(self) -> None:
        """End a line a killed writer left unfinished, so the first event appended now is a line of its own."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
            if torn:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, b"\n")
                finally:
                    os.close(fd)
        except OSError:
            return  # no log yet, an empty one, or an unwritable one: nothing to end

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "event": event,
            "rank": self.rank,
            "host": self._host,
            "pid": os.getpid(),
            **{k: _jsonable(v) for k, v in fields.items()},
        }
        data = (json.dumps(line, sort_keys=True) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError:
            return  # the log must never turn a good save into a failure
        try:
            os.write(fd, data)
        except OSError:
            pass
        finally:
            os.close(fd)


def record_failure(events: EventLog, event: str, exc: CheckpointError, *, step: int | None = None) -> None:
    """Log a typed error once (its traceback comes with the raise) and append it to the run's events."""
    log.error("%s: %s", type(exc).__name__, exc)
    events.emit(event, step=step, error=type(exc).__name__, message=str(exc), errno=exc.errno, failed_rank=exc.rank)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):  # NaN/inf as null: json.dumps would write NaN, which no reader parses as JSON
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """All parseable events (a torn last line after a crash is skipped)."""
    return list(iter_events(run_dir, []))


def iter_events(run_dir: Path, damaged: list[int]) -> Iterator[dict[str, Any]]:
    """The events one at a time, appending to `damaged` the numbers (from 1) of lines that are not a JSON object.

    Read line by line: a run of 100,000 saves logs half a million lines, which held as dicts at once
    took most of a gigabyte (the report folds them as they are read). Each line goes through the one
    bounded JSON reader: a torn, garbled or too deeply nested line is damage, never a crash.
    """
    try:
        f = (run_dir / EVENTS_NAME).open(encoding="utf-8", errors="replace", newline="\n")
    except OSError:
        return
    with f:
        for number, line in enumerate(f, start=1):
            try:
                event = parse_json(line, f"{EVENTS_NAME}:{number}")
            except ManifestError:
                event = None
            if isinstance(event, dict):
                yield event
            else:
                damaged.append(number)
