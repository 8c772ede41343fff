"""Preemption: SIGTERM / SIGUSR1 become "save at the next step boundary, then exit with code 75".

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM (or SIGUSR1 with ``--signal``) some
seconds before killing a job. Saving inside the signal handler would run in the middle of an
optimizer step; instead the handler only sets a flag, and the training loop asks
:meth:`PreemptionWatcher.should_stop` at each step boundary. Under torch.distributed the flag is
OR-reduced across ranks, so all ranks stop at the same step even if only one got the signal.

Where there is nothing to save and no step boundary comes soon (preparing the data), the loop asks
for :meth:`PreemptionWatcher.interrupting` instead: a signal then raises :class:`Preempted` at once.
torch is imported only when a collective is needed, so an entry point can watch signals before it.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

log = logging.getLogger("ckptguard")

#: Exit status after a preemption save (EX_TEMPFAIL: "try again later"), distinct from success and crashes.
PREEMPTED_EXIT_CODE = 75


class Preempted(BaseException):  # like KeyboardInterrupt: no `except Exception` may swallow it
    """A stop signal arrived inside :meth:`PreemptionWatcher.interrupting`: stop now, nothing to save."""

    def __init__(self, sig: signal.Signals) -> None:
        super().__init__(f"{sig.name} received")
        self.signal = sig


class PreemptionWatcher:
    """Installs handlers for `signals` on construction; `close()` (or leaving ``with``) restores the old ones.

    A training loop that already all-reduces something each step can fold ``received is not None``
    into that collective instead of calling :meth:`should_stop` (the trainer does).

    A signal in `abort_on_repeat` (SIGINT, for a person at a terminal) is watched too, acknowledged on stderr the
    first time; once any signal was received, it raises KeyboardInterrupt at once: the way out
    when the save at the next step boundary is not worth waiting for. It raises once: a signal while the
    abort is under way is ignored, so the abort's own cleanup and message cannot be cut short (Ctrl-\\,
    SIGQUIT, still kills at once). After :meth:`ending`, the acknowledgement says the run is ending
    instead of promising a save.
    """

    def __init__(
        self,
        signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1),
        *,
        abort_on_repeat: tuple[signal.Signals, ...] = (),
    ) -> None:
        self.received: signal.Signals | None = None
        self._abort_on_repeat = abort_on_repeat
        self._interrupting = False
        self._ending = False  # no step boundary comes any more: nothing is saved on a first signal
        self._ignoring = False  # KeyboardInterrupt was raised: the abort is under way
        self._previous: dict[signal.Signals, Any] = {}
        for sig in dict.fromkeys((*signals, *abort_on_repeat)):  # each once: close() restores the first
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig, repeated = signal.Signals(signum), self.received is not None
        if self._ignoring:
            return
        if sig in self._abort_on_repeat and repeated:
            self._ignoring = True
            raise KeyboardInterrupt(f"{sig.name} while already stopping")
        self.received = sig  # before the notice: a handler can run again inside this one
        if sig in self._abort_on_repeat:
            then = "the run is ending already" if self._ending else "saving at the next step boundary, then exiting"
            # os.write, not print: the handler may run in the middle of a print to the same stream.
            os.write(2, f"\n{sig.name}: {then} ({sig.name} again: abort now)\n".encode())
        if self._interrupting:
            raise Preempted(sig)

    @contextmanager
    def interrupting(self) -> Iterator[None]:
        """Inside, a stop signal (or one received before) raises :class:`Preempted`: for work with nothing to save.

        The handler raises in whatever code runs when the signal lands, and some code swallows what it
        did not expect (an extension module's import, a ``finally`` that raises anew): a signal received
        inside is raised again on the way out, over whatever else ended the work, so it is never lost.
        """
        if self.received is not None:
            raise Preempted(self.received)
        self._interrupting = True
        try:
            yield
        except (Preempted, KeyboardInterrupt):  # a stop already, or the abort a repeated signal asks for
            raise
        except BaseException as exc:
            if self.received is None:
                raise
            raise Preempted(self.received) from exc
        finally:
            self._interrupting = False
        if self.received is not None:
            raise Preempted(self.received)

    def should_stop(self) -> bool:
        """True on every rank once any rank received a preemption signal (a collective when distributed)."""
        flag = self.received is not None
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([int(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            log.warning(
                "preemption signal %s received: saving at this step boundary, then exiting",
                self.received.name if self.received else "(on another rank)",
            )
        return flag

    def ending(self) -> None:
        """The training loop is over (its last save is behind it): a first Ctrl-C is not promised a save."""
        self._ending = True

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionWatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_ignore_at_exit_registered = False


def ignore_stop_signals_at_exit() -> None:
    """From the interpreter's exit on (atexit), ignore SIGINT, SIGTERM and SIGUSR1. Registered once.

    A command's outcome is decided and said by then, but torch's teardown can take a second after the
    last line, in which a SIGTERM would turn exit 0 or 75 into -15 and a Ctrl-C into a traceback.
    The kernel ignores them (SIG_IGN), so this holds while no Python runs; SIGKILL and Ctrl-\\ (SIGQUIT)
    still end an exit that hangs. In-process callers keep their handlers until their own exit.
    """
    global _ignore_at_exit_registered
    if not _ignore_at_exit_registered:
        atexit.register(_ignore_stop_signals)
        _ignore_at_exit_registered = True


def _ignore_stop_signals() -> None:
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
