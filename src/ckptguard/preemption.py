"""Preemption: SIGTERM / SIGUSR1 become "save at the next step boundary, then exit with code 75".

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM (or SIGUSR1 with ``--signal``) some
seconds before killing a job. Saving inside the signal handler would run in the middle of an
optimizer step; instead the handler only sets a flag, and the training loop asks
:meth:`PreemptionWatcher.should_stop` at each step boundary. Under torch.distributed the flag is
OR-reduced across ranks, so all ranks stop at the same step even if only one got the signal.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("ckptguard")

#: Exit status after a preemption save (EX_TEMPFAIL: "try again later"), distinct from success and crashes.
PREEMPTED_EXIT_CODE = 75


class PreemptionWatcher:
    """Installs handlers for `signals` on construction; `close()` (or leaving ``with``) restores the old ones.

    A training loop that already all-reduces something each step can fold ``received is not None``
    into that collective instead of calling :meth:`should_stop` (the trainer does).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def should_stop(self) -> bool:
        """True on every rank once any rank received a preemption signal (a collective when distributed)."""
        flag = self.received is not None
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

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionWatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
