"""What ckptguard is measured against: the disk's own limit and the savers people use today.

Every saver here ends durable (file and directory fsync), so the comparison with ckptguard, which
fsyncs, is about the work done, not about who skips the flush.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workloads import Workload

# DCP says so on every single-process save, from its own background thread too
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

CHUNK = 64 << 20  # one write/read call moves at most this much: large enough to hit disk speed


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor without a copy (contiguous CPU tensors only, as here)."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under root, then every directory (what a durable saver must do)."""
    dirs = []
    for dirpath, _dirnames, filenames in os.walk(root):
        dirs.append(Path(dirpath))
        for f in filenames:
            fsync_path(Path(dirpath) / f)
    for d in reversed(dirs):
        fsync_path(d)
    fsync_path(root.parent)


def _write_all(fd: int, data: memoryview) -> None:
    for start in range(0, len(data), CHUNK):
        view = data[start : start + CHUNK]
        while view:
            view = view[os.write(fd, view) :]


def raw_write(w: Workload, out: Path) -> None:
    """Every tensor's bytes, back to back, into one file, then fsync: the disk's limit."""
    out.mkdir()
    fd = os.open(out / "raw.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in w.flat.values():
            _write_all(fd, tensor_bytes(t))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(out)
    fsync_path(out.parent)


def torch_save(w: Workload, out: Path) -> None:
    """torch.save of the nested state dicts, as training scripts do, then fsync."""
    out.mkdir()
    torch.save(w.nested, out / "state.pt")
    fsync_tree(out)


def safetensors_save(w: Workload, out: Path) -> None:
    """safetensors.torch.save_file of the flat tensors, then fsync."""
    from safetensors.torch import save_file

    out.mkdir()
    save_file(w.flat, str(out / "state.safetensors"))
    fsync_tree(out)


def peft_save(w: Workload, out: Path) -> None:
    """PeftModel.save_pretrained (adapter only: PEFT does not save the optimizer), then fsync."""
    w.peft_model.save_pretrained(str(out))
    fsync_tree(out)


def dcp_save(w: Workload, out: Path) -> None:
    """torch.distributed.checkpoint.save in one process (no_dist); its writer fsyncs each file."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(w.nested, checkpoint_id=str(out), no_dist=True)
    fsync_path(out)
    fsync_path(out.parent)


_READ_BUF = memoryview(bytearray(8 << 20))  # allocated once: the baseline pays for reading only


def read_files(root: Path) -> int:
    """Read every file under root into one reused buffer: the plain-read baseline of verification."""
    view = _READ_BUF
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(Path(dirpath) / name, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    total += n
    return total


def drop_page_cache() -> bool:
    """Ask the kernel to drop clean page cache (needs root, and a writable /proc/sys in containers)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


class StateCopy:
    """A plain copy of every tensor's bytes into buffers allocated once: the lower limit of any snapshot.

    numpy's copyto is one memcpy per tensor on this thread. torch's copy_ would open an OpenMP
    parallel region per tensor, which costs milliseconds each when another process holds the
    other CPUs (the OpenMP worker must be scheduled first): with 1,568 LoRA tensors that is
    seconds, a cost of torch's threading, not of copying.
    """

    def __init__(self, w: Workload) -> None:
        self._src = [np.frombuffer(tensor_bytes(t), dtype=np.uint8) for t in w.flat.values()]
        self._dst = [np.empty_like(a) for a in self._src]
        self.run()  # first touch faults the pages in, so timed runs measure the copy alone

    def run(self) -> None:
        for d, s in zip(self._dst, self._src, strict=True):
            np.copyto(d, s)


class DcpAsync:
    """torch.distributed.checkpoint.async_save: `start` returns once DCP has staged its CPU copy.

    cached=True gives DCP its best CPU configuration (a DefaultStager that reuses its staging
    buffers and stages synchronously, so the state may change as soon as the call returns);
    cached=False is what async_save does by default (a fresh copy each call).
    """

    def __init__(self, cached: bool) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        opts = StagingOptions(False, False, False, False)  # no pinned/shared memory on CPU-only torch
        self._stager = DefaultStager(opts) if cached else None
        self._future: Any = None

    def start(self, w: Workload, out: Path) -> None:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kw = {"async_stager": self._stager} if self._stager is not None else {}
            self._future = dcp.async_save(w.nested, checkpoint_id=str(out), no_dist=True, **kw)

    def wait(self) -> None:
        self._future.result()
        self._future = None

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()


SAVERS: dict[str, Callable[[Workload, Path], None]] = {
    "raw": raw_write,
    "torch_save": torch_save,
    "safetensors": safetensors_save,
    "peft": peft_save,
    "dcp": dcp_save,
}
