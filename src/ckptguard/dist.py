"""Rank roles and collective agreement on every save, with a time bound on every collective.

Checkpoint coordination runs on its own gloo group (CPU, independent of NCCL and of the training's
own collectives), created with ``timeout_s``: a rank that died or hangs turns into a
CoordinationError on every other rank after at most that long, never an endless barrier.
Errors travel between ranks as small JSON-able summaries and are raised as the same type on
every rank, naming the rank that failed. A rank that dies cannot send its error: each rank marks its
arrival at every collective in the job's key-value store, so when a collective fails the survivors
name the ranks that never arrived.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from ckptguard.errors import CheckpointError, CoordinationError, from_summary

T = TypeVar("T")


class Coordinator:
    """World of one when torch.distributed is not initialised; otherwise a gloo group of all ranks."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1
        self._group = (
            dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
            if self.active and self.world_size > 1
            else None
        )
        self._calls = 0  # every rank makes the same collectives in the same order: this counts alike
        self._store = job_store() if self._group is not None else None

    @classmethod
    def alone(cls) -> Coordinator:
        """A world of one, even inside a distributed job: for a save one process makes by itself (an
        adapter, an export, Lightning's CheckpointIO, which Lightning calls on rank 0 only)."""
        self = cls.__new__(cls)
        self.timeout_s, self.active, self.rank, self.world_size = 0.0, False, 0, 1
        self._group, self._calls, self._store = None, 0, None
        return self

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def on_primary(self, fn: Callable[[], T], *, step: int | None = None) -> T:
        """Run `fn` on rank 0 and give every rank its result, or raise its error on every rank."""
        result: Any = None
        error: dict[str, Any] | None = None
        if self.is_primary:
            try:
                result = fn()
            except Exception as exc:  # any failure on rank 0 must reach the others, not strand them
                if self._group is None:
                    raise
                wrapped = exc if isinstance(exc, CheckpointError) else CheckpointError(f"{type(exc).__name__}: {exc}")
                wrapped.rank = 0
                error = wrapped.summary()
        if self._group is None:
            return result
        payload = [(result, error)]
        self._collective(lambda: dist.broadcast_object_list(payload, src=0, group=self._group), step)
        result, error = payload[0]
        if error is not None:
            raise from_summary(error)
        return result

    def agree(self, local_error: CheckpointError | None, value: T, *, step: int | None = None) -> list[T]:
        """Every rank contributes (error or value); all get all values, or all raise the first error."""
        if self._group is None:
            if local_error is not None:
                raise local_error
            return [value]
        if local_error is not None:
            local_error.rank = self.rank
        mine = (value, local_error.summary() if local_error is not None else None)
        gathered: list[Any] = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(gathered, mine, group=self._group), step)
        for rank, (_, error) in enumerate(gathered):
            if error is not None:
                if rank == self.rank and local_error is not None:
                    raise local_error
                raise from_summary(error)
        return [v for v, _ in gathered]

    @property
    def group(self) -> Any:
        """The coordination group (gloo, with the timeout), for engines that run their own collectives; None alone."""
        return self._group

    def _collective(self, op: Callable[[], None], step: int | None) -> None:
        def reached(arrived: Callable[[], None]) -> None:
            arrived()
            op()

        self.guarded(reached, step=step, missing="never reached it")

    def guarded(self, op: Callable[[Callable[[], None]], T], *, step: int | None, missing: str) -> T:
        """Run `op`, a stretch of collectives; when one fails, name the ranks that never marked their part done.

        `op` calls the function it is given once this rank's share is done (for a plain collective:
        on arrival; for a sharded write: once its files are written), so a rank killed before that
        point is the one named, in the words of `missing` ("rank 1 never ...").
        """
        self._calls += 1
        call, prefix = self._calls, f"ckptguard/{getattr(self._group, 'group_name', '')}/"
        try:
            # one key per rank, holding the last stretch it finished: a set is sent without waiting for
            # a reply, and the keys do not grow with the run
            result = op(lambda: self._store_call(lambda store: store.set(f"{prefix}{self.rank}", str(call))))
        except (RuntimeError, ConnectionError) as exc:  # gloo reports timeouts and dead peers as these
            absent = self._store_call(
                lambda store: [r for r in range(self.world_size) if _reached(store, f"{prefix}{r}") < call]
            )
            who = f"rank {', '.join(map(str, absent))} {missing}" if absent else "another rank died or hung"
            raise CoordinationError(
                f"ranks could not agree on the save within {self.timeout_s:g}s: {who} "
                f"(this is rank {self.rank}; {str(exc).splitlines()[0]})",
                step=step,
                rank=absent[0] if absent and len(absent) == 1 else None,
            ) from exc
        return result

    def _store_call(self, fn: Callable[[Any], T]) -> T | None:
        """A store operation for diagnosis only: never the reason a save fails or hangs."""
        if self._store is None:
            return None
        try:
            return fn(self._store)
        except (RuntimeError, ConnectionError, ValueError):
            return None


def _reached(store: Any, key: str) -> int:
    """The last stretch a rank marked done (0: none); never blocks on a key the rank never set."""
    return int(store.get(key)) if store.check([key]) else 0


def job_store() -> Any:
    """The job's TCPStore (torchrun's agent or the tcp:// init's), or None where it cannot be had."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except (ImportError, RuntimeError, ValueError):
        return None
    return store
