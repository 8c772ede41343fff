"""xxh3-128 off the critical path: hash on a second thread while the first writes or reads.

Both ``os.write``/``readinto`` and xxhash release the GIL, so on two cores a save or a verify runs
at the speed of the slower of the two instead of their sum. Order matters for a hash, so every
file gets one worker thread that takes pieces first-in first-out; small pieces are batched so a
file of a thousand small tensors does not pay a thread hand-off per tensor.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import xxhash

READ_CHUNK = 8 << 20
_BATCH = 1 << 20


def _update_all(hasher: xxhash.xxh3_128, pieces: list[memoryview]) -> None:
    for piece in pieces:
        hasher.update(piece)


class BackgroundHasher:
    """Feeds pieces to xxh3-128 on one worker thread, in the order they were added.

    The caller must not change a piece's memory until it is hashed (pieces are views, not copies):
    tensor memory is left alone until :meth:`hexdigest`; a read buffer is reused only after the
    future :meth:`flush` returned for it is done.
    """

    def __init__(self) -> None:
        self._hasher = xxhash.xxh3_128()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptguard-hash")
        self._batch: list[memoryview] = []
        self._batched = 0
        self._last: Future[None] | None = None

    def add(self, piece: memoryview) -> None:
        self._batch.append(piece)
        self._batched += len(piece)
        if self._batched >= _BATCH:
            self.flush()

    def flush(self) -> Future[None] | None:
        """Hand the pieces added so far to the worker; the future is done once they are hashed."""
        if self._batch:
            batch, self._batch, self._batched = self._batch, [], 0
            self._last = self._pool.submit(_update_all, self._hasher, batch)
        return self._last

    def hexdigest(self) -> str:
        last = self.flush()
        if last is not None:
            last.result()
        self.close()
        return self._hasher.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def hash_file(path: Path) -> tuple[int, str]:
    """Size and xxh3-128 of a file: two rotating read buffers, reading one while the other is hashed.

    Plain reads, not mmap: a file truncated under a memory map kills the process with SIGBUS, and
    verification must survive hostile or damaged files.
    """
    size_hint = os.path.getsize(path)
    buffers = [memoryview(bytearray(max(1, min(READ_CHUNK, size_hint)))) for _ in range(2)]
    in_use: list[Future[None] | None] = [None, None]
    hasher = BackgroundHasher()
    size, turn = 0, 0
    try:
        with open(path, "rb", buffering=0) as fh:
            while True:
                slot = turn % 2
                if in_use[slot] is not None:
                    in_use[slot].result()  # the buffer's last content is hashed: safe to overwrite
                n = fh.readinto(buffers[slot])
                if not n:
                    break
                hasher.add(buffers[slot][:n])
                in_use[slot] = hasher.flush()
                size += n
                turn += 1
        return size, hasher.hexdigest()
    finally:
        hasher.close()
