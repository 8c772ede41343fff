"""Real faults for tests: small and read-only filesystems, unprivileged processes, SIGKILL mid-save.

Nothing here mocks ckptguard. A full disk is a real size- or inode-limited tmpfs, a read-only
disk is a real read-only mount, "permission denied" is a real process that lost root's
permission bypass (CAP_DAC_OVERRIDE), a crash is a real SIGKILL of a real process. Faults that
need a privilege this machine does not give are skipped with the reason, so the suite still
passes on a laptop.

The crash harness keeps each trial cheap: a helper process (the *zygote*, ``python faultkit.py
zygote``) imports torch and ckptguard once, then forks one saving child per trial and SIGKILLs it
after a given delay. Without it every trial would pay the ~2 s torch import. Power cuts (a
filesystem that forgets what was not fsynced) are in powerfs.py and powerkit.py, their trials in
powercut.py.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

# Keep uid 0 (so the interpreter under /root stays readable) but drop the two capabilities that
# let root ignore permission bits: the child then gets EACCES like any normal user would.
DROP_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]


# --- filesystems -------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, *, size: str = "2m", nr_inodes: int | None = None) -> Iterator[Path]:
    """Mount a fresh tmpfs of `size` bytes (and at most `nr_inodes` inodes) at `where`.

    Always unmounted on exit, even when the test failed; a busy mount is detached lazily so a
    stray open file cannot leave it behind.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (run the suite as root, e.g. in CI)")
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={nr_inodes}" if nr_inodes is not None else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip() or f"exit status {done.returncode}").splitlines()[0]
        pytest.skip(f"cannot mount a tmpfs here ({reason})")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)


def remount_read_only(where: Path) -> None:
    """Turn the tmpfs at `where` read-only in place (what an admin's `mount -o remount,ro` does)."""
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def free_inodes(path: Path) -> int:
    """Inodes still free on the filesystem holding `path`."""
    return os.statvfs(path).f_favail


class Filler:
    """Occupies a filesystem so that exactly the requested bytes or inodes stay free.

    Bytes are taken by a really allocated file (fallocate; tmpfs gives back pages on truncate),
    inodes by empty files, so the run directory sees a genuinely full disk.
    """

    def __init__(self, disk: Path) -> None:
        self.file = disk / "filler.bin"
        self.dir = disk / "filler-inodes"
        self.file.touch()
        self.dir.mkdir()
        self._inodes: list[Path] = []

    def leave_bytes(self, n: int) -> None:
        size = self.file.stat().st_size
        target = size + free_bytes(self.file) - n
        if target < size:
            os.truncate(self.file, max(target, 0))
        elif target > size:
            with open(self.file, "r+b") as fh:
                os.posix_fallocate(fh.fileno(), size, target - size)

    def leave_room_for_all_but(self, like: Path, name: str) -> None:
        """Leave room for a save like checkpoint `like` except half of its file `name`: the next save of the
        same shape writes every file before that one, and runs out of space in the middle of it."""
        others = [p for p in like.rglob("*") if p.is_file() and p.name != name]
        self.leave_bytes(sum(p.stat().st_size + 4096 for p in others) + (like / name).stat().st_size // 2)

    def leave_inodes(self, n: int) -> None:
        while free_inodes(self.dir) > n:
            self._inodes.append(self.dir / str(len(self._inodes)))
            self._inodes[-1].touch()
        while free_inodes(self.dir) < n and self._inodes:
            self._inodes.pop().unlink()

    def release(self) -> None:
        """Give everything back."""
        os.truncate(self.file, 0)
        while self._inodes:
            self._inodes.pop().unlink()


def flip_bit(path: Path, offset: int) -> None:
    """Flip the lowest bit of the byte at `offset` (negative: from the end), as failing media does."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def forge_file(checkpoint: Path, relpath: str, data: bytes) -> None:
    """Replace one file of a committed checkpoint and re-sign its manifest: a hostile file that passes every hash.

    Hashes prove integrity, not origin: what such a file can make the library do is what the checks
    after the hashes must bound.
    """
    import dataclasses

    import xxhash

    from ckptguard.format.manifest import FileEntry, read_manifest

    manifest = read_manifest(checkpoint)
    (checkpoint / relpath).write_bytes(data)
    entry = FileEntry(size=len(data), xxh3_128=xxhash.xxh3_128_hexdigest(data), rank=manifest.files[relpath].rank)
    forged = dataclasses.replace(manifest, files={**manifest.files, relpath: entry})
    (checkpoint / "MANIFEST.json").write_bytes(forged.to_json_bytes())


# --- other processes ---------------------------------------------------------------------------

# Runs in a child: build a CheckpointManager, report the outcome as one JSON line; with "hold", keep it
# open (so a parent can observe the lock) until its stdin closes: the parent is done, or gone.
_CONSTRUCT = """
import json, sys
from ckptguard import CheckpointManager
from ckptguard.errors import CheckpointError
kwargs = json.loads(sys.argv[2])
try:
    mgr = CheckpointManager(sys.argv[1], **kwargs)
except CheckpointError as e:
    print(json.dumps({"ok": False, "type": type(e).__name__, "text": str(e), "path": e.path,
                      "errno": e.errno, "remedy": e.remedy}), flush=True)
    sys.exit(0)
print(json.dumps({"ok": True}), flush=True)
if sys.argv[3] == "hold":
    sys.stdin.read()
mgr.close()
"""


def _dac_override_dropped() -> bool:
    """Whether DROP_DAC really takes CAP_DAC_OVERRIDE (bit 1) away here; setpriv can fail silently."""
    if shutil.which("setpriv") is None:
        return False
    done = subprocess.run([*DROP_DAC, "cat", "/proc/self/status"], capture_output=True, text=True)
    caps = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("CapEff:")]
    return done.returncode == 0 and bool(caps) and not int(caps[0], 16) & 0b10


def python_cmd(code: str, *args: str, unprivileged: bool = False) -> list[str]:
    """argv running `code` in a fresh interpreter; `unprivileged`: without root's permission bypass."""
    cmd = [sys.executable, "-c", code, *args]
    if unprivileged and os.geteuid() == 0:
        if not _dac_override_dropped():
            pytest.skip("cannot drop root's CAP_DAC_OVERRIDE here (needs setpriv and CAP_SETPCAP)")
        cmd = DROP_DAC + cmd
    return cmd


def construct_in_child(run_dir: Path, *, unprivileged: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Construct a CheckpointManager in a second, real process and return what happened.

    `{"ok": True}` or `{"ok": False, "type": ..., "text": str(error), "path", "errno", "remedy"}`.
    """
    cmd = python_cmd(_CONSTRUCT, str(run_dir), json.dumps(kwargs), "", unprivileged=unprivileged)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"child crashed instead of raising a CheckpointError:\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def manager_in_child(run_dir: Path, **kwargs: Any) -> Iterator[subprocess.Popen]:
    """A second process that holds a CheckpointManager (and so the lock) on `run_dir` until the block ends."""
    cmd = python_cmd(_CONSTRUCT, str(run_dir), json.dumps(kwargs), "hold")
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert json.loads(line or "{}").get("ok"), f"holder failed: {line}{child.stderr.read()}"
        yield child
    finally:
        child.kill()
        child.wait(timeout=30)


def freeze(proc: subprocess.Popen) -> None:
    """SIGSTOP `proc` and wait until the kernel shows every one of its threads stopped (state T).

    kill() returns once the signal is queued; a thread still running may send one more request.
    """

    def stopped() -> bool:
        states = []
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
        return bool(states) and all(state in ("T", "t") for state in states)

    proc.send_signal(signal.SIGSTOP)
    while not stopped():
        assert proc.poll() is None, f"pid {proc.pid} ended (rc={proc.returncode}) instead of stopping"
        time.sleep(0.01)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick, so parallel tests differ)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(commands: list[list[str]]) -> list[subprocess.Popen]:
    """One process per rank, wired as torchrun wires them (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK)."""
    port = str(free_port())
    procs = []
    for rank, cmd in enumerate(commands):
        wiring = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(len(commands)),
                  "RANK": str(rank), "LOCAL_RANK": str(rank)}  # fmt: skip
        rank_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **wiring}
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=rank_env))
    return procs


# --- crash harness -----------------------------------------------------------------------------

WIDTH = 64 * 1024  # float32 values: 256 KiB per save, plus a small int64 tensor


class StepState:
    """Training state whose every value is a function of the step, so any mix-up shows."""

    def __init__(self, step: int = 0) -> None:
        self.tensors = expected_tensors(step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensors = dict(state)

    def advance(self, step: int) -> None:
        """Move to `step` in place, as an optimizer updates parameters (catches aliased snapshots)."""
        for key, value in expected_tensors(step).items():
            self.tensors[key].copy_(value)

    def matches(self, step: int) -> bool:
        """True only if every tensor holds exactly what step `step` saved."""
        want = expected_tensors(step)
        got = self.tensors
        return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def expected_tensors(step: int) -> dict[str, torch.Tensor]:
    return {
        "w": torch.arange(WIDTH, dtype=torch.float32) + step * 0.5,
        "idx": torch.arange(1024, dtype=torch.int64) * step,
    }


def _saving_child(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """Resume from `run_dir`, then save step after step; report a step only once its save is done.

    A background save of step s is done when the save of step s+1 returns (it waits for s first).
    """
    from ckptguard import CheckpointManager

    model = StepState()
    with CheckpointManager(run_dir, keep_last=keep_last, async_save=async_save) as mgr:
        restored = mgr.restore({"model": model, "step": 0})
        first = restored.step + 1 if restored is not None else 1
        os.write(1, f"start {first - 1}\n".encode())
        Path(started_marker(run_dir)).write_text("start", encoding="utf-8")  # starts a trial's kill clock
        for step in range(first, first + max_steps):
            model.advance(step)
            mgr.save(step, {"model": model, "step": step})
            done = step - 1 if async_save else step
            if done >= first:
                os.write(1, f"saved {done}\n".encode())


def started_marker(run_dir: str | Path) -> str:
    """The file beside `run_dir` the saving child writes once it resumed: a trial's clock may start there."""
    return f"{run_dir}.started"


def _fork_and_kill(child: Callable[[], None], delay_s: float, start_after: list[str] | None = None) -> int:
    """Run `child` in a forked process and SIGKILL it after `delay_s` unless it ended first; its wait status.

    With `start_after` = [path, word], the delay counts from when that file first holds the word (the
    child's first acknowledged save, say; at most 120 s), so a loaded machine cannot push every kill
    before it.
    """
    pid = os.fork()
    if pid == 0:
        try:
            child()
        except BaseException as e:
            os.write(1, f"error {json.dumps(repr(e))}\n".encode())
            os._exit(1)
        os._exit(0)
    deadline = time.monotonic() + delay_s
    waiting_until = time.monotonic() + 120 if start_after else 0.0
    while time.monotonic() < max(deadline, waiting_until):
        if waiting_until and (time.monotonic() > waiting_until or _mentions(*(start_after or ["", ""]))):
            deadline, waiting_until = time.monotonic() + delay_s, 0.0
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)  # a no-op if it just finished (zombie until reaped)
    return os.waitpid(pid, 0)[1]


def _mentions(path: str, word: str) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            return word in fh.read()
    except OSError:
        return False


def _zygote(preload: list[str]) -> None:
    """Serve lines, each forking a child that is SIGKILLed after DELAY_S; report its wait status.

    ``run RUN_DIR DELAY_S CLOCK MAX_STEPS KEEP_LAST ASYNC [MODULE:FUNCTION]``: the saving child of
    :class:`CrashHarness` (:func:`_saving_child`, or FUNCTION called the same way); CLOCK ``start``
    counts the delay from the child's :func:`started_marker` instead of from the fork.
    ``call MODULE:FUNCTION DELAY_S JSON_KWARGS``: any function of a module on sys.path (tests/).
    """
    import ckptguard  # noqa: F401  (import once here; every forked child inherits it)

    for module in preload:  # heavy imports of the functions children will run, also done once
        loaded = importlib.import_module(module)
        if hasattr(loaded, "preload"):  # e.g. the training libraries an integration's savers use
            loaded.preload()
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, rest = line.partition(" ")
        if command == "call":
            target, delay, kwargs = rest.split(" ", 2)
            module, _, name = target.partition(":")
            function = getattr(importlib.import_module(module), name)
            kwargs = json.loads(kwargs)
            start_after = kwargs.pop("kill_clock_starts_at", None)
            status = _fork_and_kill(functools.partial(function, **kwargs), float(delay), start_after)
        else:
            run_dir, delay, clock, max_steps, keep_last, async_save, *named = rest.split()
            module, _, name = named[0].partition(":") if named else ("", "", "")
            function = getattr(importlib.import_module(module), name) if named else _saving_child
            saver = functools.partial(function, run_dir, int(max_steps), int(keep_last), async_save == "1")
            Path(started_marker(run_dir)).unlink(missing_ok=True)
            start_after = [started_marker(run_dir), "start"] if clock == "start" else None
            status = _fork_and_kill(saver, float(delay), start_after)
        # Every line the child wrote is already in the pipe: it is dead. A child killed between a line's
        # text and its newline (tqdm.write makes two writes) left the line open: "done" starts its own.
        print(f"\ndone {status}", flush=True)


@dataclass
class Trial:
    """What one saving child said before it died."""

    start: int | None = None  # step it resumed from (0: nothing to resume)
    saved: list[int] = field(default_factory=list)  # steps whose save() returned
    killed: bool = False  # False: it exited by itself (error, or max_steps reached)
    error: str | None = None


@dataclass
class Call:
    """What a child run by :meth:`CrashHarness.call` printed before it ended, and whether it was killed."""

    lines: list[str]
    killed: bool

    def error(self) -> str | None:
        """The exception the child died of, if it raised."""
        errors = [json.loads(line[6:]) for line in self.lines if line.startswith("error ")]
        return errors[-1] if errors else None


def _killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


class CrashHarness:
    """Runs saving children in a forking helper process and SIGKILLs each after a delay.

    Use as a context manager; `trial(run_dir, delay_s)` is bounded by `delay_s` plus the helper's
    reply timeout (a hang bound, never a speed limit: 600 s by default), even if the child hangs.
    """

    def __init__(
        self, reply_timeout_s: float = 600.0, preload: tuple[str, ...] = (), savers: str | None = None
    ) -> None:
        """`preload`: modules importable from tests/ to import once in the zygote; `savers`: one of them whose
        functions :meth:`trial` may fork by name (``trial(saver="hf_saver")``)."""
        self.reply_timeout_s = reply_timeout_s
        self._savers = savers
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "zygote", *preload, *([savers] if savers else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self._next(120.0) == "ready"

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip():  # the zygote's "done" comes after a newline of its own
                self._lines.put(line.strip())
        self._lines.put("eof")

    def _next(self, timeout: float) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"crash harness: no reply within {timeout} s") from None

    def trial(
        self,
        run_dir: Path,
        delay_s: float,
        *,
        async_save: bool = False,
        max_steps: int = 100,
        keep_last: int = 3,
        saver: str = "",
        after_start: bool = False,
    ) -> Trial:
        """Fork a saver on `run_dir`, SIGKILL it after `delay_s` (unless it ends first), and return what it reported.

        `after_start` (the default saver only) counts `delay_s` from when the child has resumed, so
        that on a busy machine, where start-up takes longer, the kill still lands among the saves.
        """
        assert self._proc.stdin is not None
        saver = f"{self._savers}:{saver}" if saver and ":" not in saver else saver
        clock = "start" if after_start else "fork"
        line = f"run {run_dir} {delay_s:.4f} {clock} {max_steps} {keep_last} {int(async_save)} {saver}"
        self._proc.stdin.write(line.rstrip() + "\n")
        self._proc.stdin.flush()
        result = Trial()
        while True:
            kind, _, rest = self._next(delay_s + self.reply_timeout_s).partition(" ")
            if kind == "start":
                result.start = int(rest)
            elif kind == "saved":
                result.saved.append(int(rest))
            elif kind == "error":
                result.error = json.loads(rest)
            elif kind == "done":
                result.killed = _killed(int(rest))
                return result
            else:
                raise RuntimeError(f"crash harness died (last line: {kind} {rest})")

    def call(self, target: str, delay_s: float, **kwargs: Any) -> Call:
        """Run ``module:function(**kwargs)`` in a forked child, SIGKILL it after `delay_s` unless it ended first.

        The module is imported from tests/ (pass it as `preload` to import it once, up front).
        """
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"call {target} {delay_s:.4f} {json.dumps(kwargs)}\n")
        self._proc.stdin.flush()
        lines = []
        while True:
            line = self._next(delay_s + self.reply_timeout_s)
            kind, _, rest = line.partition(" ")
            if kind == "done":
                return Call(lines, _killed(int(rest)))
            if kind == "eof":
                raise RuntimeError(f"crash harness died (last lines: {lines[-3:]})")
            lines.append(line)

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait(timeout=30)

    def __enter__(self) -> CrashHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_ITERATION = re.compile(r"checkpoint_(\d+)")  # Accelerate's automatic naming: the step is in the manifest


def kill_phase(run_dir: Path, floor: int) -> str:
    """Where the kill landed, read from the disk before anything cleans it up.

    "write": a staging directory without its manifest; "commit": a staging directory with its
    manifest, or a committed checkpoint newer than the last save that returned (renamed, but not
    yet verified/LATEST/pruned); "other": between saves, in preflight, restore or snapshot.
    """
    if not run_dir.is_dir():
        return "other"
    staging = list(run_dir.glob(".staging-*"))
    if staging:
        return "commit" if any((s / "MANIFEST.json").exists() for s in staging) else "write"
    steps = [int(m.group(1)) for p in run_dir.iterdir() if (m := _CHECKPOINT.fullmatch(p.name))]
    return "commit" if steps and max(steps) > floor else "other"


def committed_steps(run_dir: Path) -> list[int]:
    """Steps whose ``checkpoint-{step}`` directory passes full verification, judged independently; and of
    Accelerate's ``checkpoint_{iteration}``, the step its verified manifest records."""
    from ckptguard import verify_checkpoint

    if not run_dir.is_dir():  # killed before its preflight created it
        return []
    steps = []
    for path in run_dir.iterdir():
        named, iteration = _CHECKPOINT.fullmatch(path.name), _ITERATION.fullmatch(path.name)
        report = verify_checkpoint(path, level="full") if named or iteration else None
        if report is not None and report.ok:
            steps.append(int(named.group(1)) if named else report.manifest.step)
    return sorted(steps)


CRASH_LITTER = (".staging-", ".trash-")  # what a kill mid-save or mid-prune leaves
STARTUP_LITTER = (".ckptguard-probe-", ".LATEST.tmp-")  # what a kill in preflight or at LATEST leaves


def check_resume(run_dir: Path, floor: int, litter: tuple[str, ...] = CRASH_LITTER) -> int:
    """Resume with a fresh manager in this process after a kill; assert it loaded the right thing.

    `floor` is the newest step known committed (the last save that returned, or the previous
    resume point). At most one save was in flight, so the newest fully valid checkpoint on disk is
    `floor` or `floor + 1` (renamed into place, killed before save() returned); restore must pick
    exactly that one, with exactly that step's content, and startup must have removed every
    entry starting with one of `litter`. Returns the restored step (0: none).
    """
    from ckptguard import CheckpointManager

    committed = committed_steps(run_dir)
    newest = committed[-1] if committed else 0
    assert newest in (floor, floor + 1), f"newest valid checkpoint is {newest}, step {floor} was committed"
    model = StepState(-1)
    with CheckpointManager(run_dir) as mgr:  # the dead child's lock was released by the kernel
        leftovers = sorted(p.name for p in run_dir.iterdir() if p.name.startswith(litter))
        assert not leftovers, f"left behind after startup: {leftovers}"
        restored = mgr.restore({"model": model, "step": 0})
    step = restored.step if restored is not None else 0
    assert step == newest, f"resumed at step {step}, but checkpoint-{newest} is the newest valid one"
    if restored is not None:
        assert restored.values == {"step": step}, f"values {restored.values} in checkpoint of step {step}"
        assert model.matches(step), f"tensors restored from {restored.path} are not those of step {step}"
    return step


if __name__ == "__main__":
    if sys.argv[1:2] == ["zygote"]:
        _zygote(sys.argv[2:])
    else:
        sys.exit("usage: faultkit.py zygote [MODULE_TO_PRELOAD ...]")
