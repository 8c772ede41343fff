"""events.py: the events log survives concurrent writers in real processes, a writer killed mid-line, and
values JSON cannot spell; a damaged line is counted, never a crash, and never takes its neighbours with it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from ckptguard.files.events import EventLog, iter_events, read_events
from ckptguard.format.layout import EVENTS_NAME

_WRITER = """
import sys
from pathlib import Path
from ckptguard.files.events import EventLog
log = EventLog(Path(sys.argv[1]), rank=int(sys.argv[2]))
print("ready", flush=True)
sys.stdin.readline()  # every writer starts together once the parent says so
for i in range(int(sys.argv[3])):
    log.emit("save", step=i, padding="x" * 3000)
"""


def test_concurrent_writers_in_real_processes_never_interleave_inside_a_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), str(rank), "200"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(4)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.close()
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    damaged: list[int] = []
    events = list(iter_events(tmp_path, damaged))
    assert damaged == []
    for rank in range(4):
        assert [e["step"] for e in events if e["rank"] == rank] == list(range(200))


def test_a_torn_last_line_from_a_killed_writer_is_counted_and_the_rest_read(tmp_path: Path) -> None:
    EventLog(tmp_path).emit("save", step=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = (
        "import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND); "
        'os.write(fd, b\'{"event": "save", "step": 2, "se\'); print(\'torn\', flush=True); sys.stdin.read()'
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / EVENTS_NAME)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout is not None and child.stdout.readline().strip() == "torn"
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    damaged: list[int] = []
    assert [e["step"] for e in iter_events(tmp_path, damaged)] == [1]
    assert damaged == [2]
    EventLog(tmp_path).emit("resume", step=1)  # the next writer appends after the torn line, not into it
    damaged = []
    assert [e["event"] for e in iter_events(tmp_path, damaged)] == ["save", "resume"] and damaged == [2]


def test_non_finite_values_are_written_as_valid_json_and_the_event_is_kept(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.emit("save", step=1, seconds=math.inf, metrics={"loss": math.nan, "acc": 0.5}, losses=[1.0, -math.inf])
    log.emit("save", step=2, seconds=0.1234567)
    for line in (tmp_path / EVENTS_NAME).read_text().splitlines():
        json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # no NaN/Infinity literals
    damaged: list[int] = []
    first, second = iter_events(tmp_path, damaged)
    assert damaged == []
    assert first["seconds"] is None and first["metrics"] == {"loss": None, "acc": 0.5}
    assert first["losses"] == [1.0, None]
    assert second["seconds"] == 0.123457  # rounded to microseconds


def test_every_event_names_its_writer_and_paths_are_strings(tmp_path: Path) -> None:
    EventLog(tmp_path, rank=3).emit("prune", path=tmp_path / "checkpoint-1")
    (event,) = read_events(tmp_path)
    assert (event["event"], event["rank"], event["pid"], event["path"]) == (
        "prune",
        3,
        os.getpid(),
        str(tmp_path / "checkpoint-1"),
    )
    assert {"time", "host"} <= event.keys()


def test_a_disabled_log_writes_nothing_and_an_unwritable_one_never_fails_the_caller(tmp_path: Path) -> None:
    EventLog(tmp_path, rank=1, enabled=False).emit("save", step=1)
    assert not (tmp_path / EVENTS_NAME).exists()
    EventLog(tmp_path / "missing-dir").emit("save", step=1)  # ENOENT: swallowed, the save is not failed
    assert read_events(tmp_path / "missing-dir") == []


def test_garbage_lines_are_counted_by_number_and_never_crash_the_reader(tmp_path: Path) -> None:
    EventLog(tmp_path).emit("save", step=1)
    with open(tmp_path / EVENTS_NAME, "ab") as fh:
        fh.write(b"\xff\xfe not json\n[1, 2]\n" + b"[" * 100_000 + b"\n")
    EventLog(tmp_path).emit("save", step=2)
    damaged: list[int] = []
    assert [e["step"] for e in iter_events(tmp_path, damaged)] == [1, 2]
    assert damaged == [2, 3, 4]
