"""Saves that persist on a background thread: one in flight at most, its error never lost.

Three things make this more than a thread pool:

* **Interpreter exit.** Python tears down ``concurrent.futures`` (no new pool work) in a hook that runs
  *before* ``atexit`` handlers, and a save needs pools (hashing, parallel writes, verification). A save
  still in flight when the script ends (last line, ``sys.exit``, an unhandled exception, ``del mgr``)
  is therefore finished from a hook registered with the same mechanism *after* that one, so it runs
  first. Its failure, if any, is already in events.jsonl; here it is also logged. Work queued behind
  the save (the upload of what it committed, which needs boto3's pools) is finished in the same hook,
  after the save: :func:`finish_before_pools_close`.
* **Fork.** A forked child inherits the parent's objects but not its threads: waiting on the parent's
  in-flight save would hang forever. Everything here belongs to the process that created it; in any
  other process it refuses to save and never waits.
* **Errors.** A failed background save is raised once, at the next ``wait()``.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

log = logging.getLogger("ckptguard")
T = TypeVar("T")

_live: weakref.WeakSet[BackgroundSaves] = weakref.WeakSet()
_after_saves: weakref.WeakSet[Any] = weakref.WeakSet()


class BackgroundSaves(Generic[T]):
    """A single background thread that runs one persist function at a time."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[T] | None = None
        _live.add(self)

    @property
    def inherited(self) -> bool:
        """True in a forked child: the thread and the work in flight stayed with the parent."""
        return os.getpid() != self.pid

    @property
    def in_flight(self) -> bool:
        return self._pending is not None and not self.inherited

    def submit(self, fn: Callable[[], T]) -> None:
        """Run `fn` in the background; the caller waits for the previous one first."""
        assert self._pending is None, "wait() before submitting the next save"
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptguard-save")
        self._pending = self._executor.submit(fn)

    def wait(self) -> T | None:
        """Block until the save in flight ends; return its result or raise its error (once)."""
        pending, self._pending = self._pending, None
        if pending is None or self.inherited:
            return None
        return pending.result()

    def shutdown(self) -> None:
        if self._executor is not None and not self.inherited:
            self._executor.shutdown(wait=True)
        self._executor = None

    def finish_at_exit(self) -> None:
        try:
            self.wait()
        except Exception as exc:  # already recorded in events.jsonl by the save itself
            log.error("a background save failed and was never waited for: %s", exc)


def finish_before_pools_close(work: Any) -> None:
    """Call ``work.finish_at_exit()`` at interpreter exit, after the saves in flight, while pools still run.

    For work that saves hand on (uploads): it must end before concurrent.futures refuses new pool
    work, or it fails half-way. Held weakly: work that was closed and dropped is forgotten.
    """
    _after_saves.add(work)


def _finish_all_at_exit() -> None:
    for saves in list(_live):
        if saves.in_flight:
            saves.finish_at_exit()
    for work in list(_after_saves):
        work.finish_at_exit()


# threading's exit hooks run in reverse order of registration, and concurrent.futures registered its
# own (which forbids new pool work) when it was imported above: this one runs before it.
threading._register_atexit(_finish_all_at_exit)  # type: ignore[attr-defined]
