"""The trainer as a real child process: start it, read its output up to a line, signal it there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

TRAIN = ("ckptguard.train",)  # `python -m ckptguard.train`, as torchrun starts it
CLI_TRAIN = ("ckptguard", "train")  # `python -m ckptguard train`: the `ckptguard train` command's path


class ImportHold:
    """Holds a child at its first import of `module` (tests/importhold) until :meth:`release`.

    The child prints `line` when it gets there: a test signals it at that moment, not after a guessed delay.
    """

    def __init__(self, module: str, where: Path) -> None:
        self.line = f"holding the import of {module}"
        self._release = where / f"release-{module}"
        path = [str(Path(__file__).parent / "importhold"), *filter(None, [os.environ.get("PYTHONPATH")])]
        self.env = {
            "CKPTGUARD_TEST_HOLD": module,
            "CKPTGUARD_TEST_RELEASE": str(self._release),
            "PYTHONPATH": os.pathsep.join(path),
        }

    def release(self) -> None:
        self._release.touch()


def start_train(
    args: list[str], threads: int | None = None, *, entry: tuple[str, ...] = TRAIN, hold: ImportHold | None = None
) -> subprocess.Popen[str]:
    """`python -m ENTRY ARGS` with unbuffered output; `threads` defaults to this process's count,
    so a child's arithmetic matches the reference runs trained here."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads or torch.get_num_threads())}
    env.update(hold.env if hold else {})
    cmd = [sys.executable, "-m", *entry, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def read_until(child: subprocess.Popen[str], text: str) -> str:
    """The child's output up to and including the first line holding `text`."""
    assert child.stdout is not None
    seen = []
    for line in child.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    child.wait(timeout=60)
    raise AssertionError(f"the trainer ended (rc={child.returncode}) before printing {text!r}:\n{''.join(seen)}")


def finish(child: subprocess.Popen[str], timeout: float) -> str:
    """The rest of the child's output once it exits (killed if it takes longer than `timeout`)."""
    try:
        return child.communicate(timeout=timeout)[0]
    finally:
        child.kill()


def signal_at(args: list[str], text: str, sig: signal.Signals, timeout: float = 120) -> tuple[int, str]:
    """Train in a child, send `sig` once it prints a line holding `text`; its exit code and whole output."""
    child = start_train(args)
    try:
        seen = read_until(child, text)
        child.send_signal(sig)
        seen += finish(child, timeout)
    finally:
        child.kill()
        child.wait()
    return child.returncode, seen
