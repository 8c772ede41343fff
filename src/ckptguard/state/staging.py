"""Host staging for background saves: the state's tensors copied into reused CPU buffers, so training goes on.

The role of torch.distributed.checkpoint's ``AsyncStager``: what a background save writes must not be
what the next training step changes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from ckptguard.state import sharded
from ckptguard.state.snapshot import Snapshot


class HostBuffers:
    """Reused CPU buffers for async snapshots: one allocation per tensor shape, kept across saves.

    CPU tensors are copied as plain memcpys (``np.copyto`` on byte views) spread over a few threads:
    one core does not saturate memory bandwidth, and torch's ``copy_`` opens an OpenMP region per
    tensor, which stalls for milliseconds each when another process holds a core (1,500 LoRA tensors).
    On CUDA the buffers are pinned and the copies run on a side stream; the training stream waits
    for them without blocking the CPU, and the writer waits on an event before reading the bytes.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._stream: Any = None

    def copy(self, snap: Snapshot) -> Any:
        """Replace every tensor in `snap` by a host copy; returns a CUDA event to wait on, or None."""
        cuda = any(t.is_cuda for f in snap.files for t in (f.tensors or {}).values())
        if cuda and self._stream is None:
            self._stream = torch.cuda.Stream()
        if cuda:
            self._stream.wait_stream(torch.cuda.current_stream())
        memcpys: list[tuple[np.ndarray, np.ndarray]] = []
        with torch.cuda.stream(self._stream) if cuda else nullcontext():
            for plan in snap.files:
                if plan.tensors is not None:
                    plan.tensors = {k: self._copy(plan.relpath, k, t, memcpys) for k, t in plan.tensors.items()}
        _parallel_memcpy(memcpys)
        snap.sharded = sharded.copy_shards(snap.sharded)
        if not cuda:
            return None
        torch.cuda.current_stream().wait_stream(self._stream)
        event = torch.cuda.Event()
        event.record(self._stream)
        return event

    def _copy(
        self, relpath: str, key: str, src: torch.Tensor, memcpys: list[tuple[np.ndarray, np.ndarray]]
    ) -> torch.Tensor:
        buf = self._buffers.get((relpath, key))
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
            self._buffers[(relpath, key)] = buf
        if src.is_cuda:
            src.record_stream(self._stream)
            buf.copy_(src, non_blocking=True)
        elif src.is_contiguous() and src.numel():
            dst_bytes, src_bytes = _bytes_of(buf), _bytes_of(src)
            memcpys.extend(
                (dst_bytes[i : i + _MEMCPY_PIECE], src_bytes[i : i + _MEMCPY_PIECE])
                for i in range(0, len(src_bytes), _MEMCPY_PIECE)
            )
        else:
            buf.copy_(src)
        return buf


_MEMCPY_PIECE = 32 << 20
_MEMCPY_THREADS = min(4, os.cpu_count() or 1)


def _parallel_memcpy(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Copy (dst, src) byte arrays on a few threads, in groups of about equal size (np.copyto drops the GIL)."""
    groups: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(_MEMCPY_THREADS)]
    loads = [0] * _MEMCPY_THREADS
    for pair in sorted(pairs, key=lambda p: -p[1].nbytes):
        lightest = loads.index(min(loads))
        groups[lightest].append(pair)
        loads[lightest] += pair[1].nbytes
    if sum(loads) < _MEMCPY_PIECE or _MEMCPY_THREADS == 1:
        _memcpy_all(pairs)
        return
    with ThreadPoolExecutor(max_workers=_MEMCPY_THREADS) as pool:
        list(pool.map(_memcpy_all, groups))


def _memcpy_all(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for dst, src in pairs:
        np.copyto(dst, src)


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).numpy()
