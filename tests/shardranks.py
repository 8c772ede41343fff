"""Real FSDP2 ranks (gloo on CPU, an explicit CPU mesh) saving and restoring through CheckpointManager.

Run as ``python shardranks.py MODE RUN_DIR [ARG]`` by :func:`run_ranks` (one process per rank, wired
as torchrun wires them); each rank prints one JSON line: what it saved or restored, as digests of
the full (gathered) parameters and optimizer moments, or the typed error it raised. Modes:

* ``train``    6 steps, saves after steps 1 and 2 (the 2nd with ``ARG`` = a fault: ``kill1`` SIGKILLs
               rank 1 while it writes its shard, ``flip1`` flips a bit of rank 1's shard file on disk
               once rank 1 has written, fsynced and closed it, ``fill`` fills the disk at ``ARG2`` first,
               ``refuse`` makes restore's decoder refuse the ``.metadata`` DCP writes; or
               ``async``: in the background while step 3 changes the shards), and reports the
               fingerprint of the state after every step;
* ``resume``   a model built from another seed restores the newest checkpoint, reports its step and
               fingerprint, takes the next step and reports again (exact resume: equal to ``train``'s);
* ``loop``     saves after every step until killed (SIGKILL of the whole job mid-save);
* ``mismatch`` a model of another width restores: reports the error, and whether its parameters and
               optimizer state are still exactly as built (a failed restore changes nothing).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

TIMEOUT_S = 8.0  # the manager's bound on every collective in these runs
WIDTH = 96  # rows of the big layer: shards of about 40 KiB per rank


def _build(seed: int, width: int = WIDTH) -> tuple[Any, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.Tanh(), torch.nn.Linear(width, 4))
    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model: Any, opt: Any, step: int) -> None:
    import torch

    rank = int(os.environ["RANK"])
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def fingerprint(model: Any, opt: Any) -> str:
    """xxh3 over every full parameter and Adam moment (gathered from the shards) and step count, in order."""
    import xxhash

    hasher = xxhash.xxh3_64()
    for p in model.parameters():
        hasher.update(p.full_tensor().detach().numpy().tobytes())
        for key, value in sorted(opt.state.get(p, {}).items()):
            hasher.update(key.encode())
            hasher.update(value.full_tensor().numpy().tobytes() if key != "step" else value.numpy().tobytes())
    return hasher.hexdigest()


def _error(exc: Exception) -> dict[str, Any]:
    return {"ok": False, "type": type(exc).__name__, "text": str(exc), "rank": getattr(exc, "rank", None),
            "errno": getattr(exc, "errno", None)}  # fmt: skip


def _main(mode: str, run_dir: str, arg: str, arg2: str) -> dict[str, Any]:
    import torch.distributed as dist

    from ckptguard import CheckpointManager
    from ckptguard.errors import CheckpointError

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = _build(seed=1 if mode == "resume" else 0, width=WIDTH + 8 if mode == "mismatch" else WIDTH)
    mgr = CheckpointManager(run_dir, timeout_s=TIMEOUT_S)
    state = {"model": model, "optimizer": opt}
    if mode == "mismatch":
        before = fingerprint(model, opt)
        try:
            mgr.restore(state)
        except CheckpointError as exc:
            unchanged = fingerprint(model, opt) == before and not opt.state
            return {**_error(exc), "unchanged": unchanged}
        return {"ok": True}
    if mode == "resume":
        restored = mgr.restore(state)
        step = restored.step if restored else 0
        before = fingerprint(model, opt)
        _step(model, opt, step + 1)
        return {"ok": True, "step": step, "restored": before, "next": fingerprint(model, opt)}
    trace: dict[int, str] = {}
    for step in range(1, 1000 if mode == "loop" else 7):
        _step(model, opt, step)
        if step == 2 and arg == "kill1" and rank == 1:
            _kill_while_writing()
        if step == 2 and arg == "flip1" and rank == 1:
            _flip_after_writing()
        if step == 2 and arg == "refuse":
            _refuse_storage_meta()
        if step == 2 and arg == "fill":
            dist.barrier()
            if rank == 0:
                _fill(Path(arg2))
            dist.barrier()
        if step <= 2 or mode == "loop":
            start = time.monotonic()
            try:
                if arg == "async" and step == 2:
                    _save_then_scribble(mgr, step, state)
                else:
                    mgr.save(step, state)
            except CheckpointError as exc:
                return {**_error(exc), "seconds": time.monotonic() - start}
        trace[step] = fingerprint(model, opt)
    mgr.close()
    return {"ok": True, "trace": trace}


def _save_then_scribble(mgr: Any, step: int, state: dict[str, Any]) -> None:
    """A background save, then at once what a training step may do to the shards: overwrite them in place.

    The save must hold the values of its step; they are put back once it has finished.
    """
    import torch

    live = [t.to_local() for t in _shards(state)]
    kept = [t.clone() for t in live]
    mgr.save(step, state, blocking=False)
    with torch.no_grad():
        for t in live:
            t.fill_(7.0)
    mgr.wait()
    with torch.no_grad():
        for t, old in zip(live, kept, strict=True):
            t.copy_(old)


def _shards(state: dict[str, Any]) -> list[Any]:
    model, opt = state["model"], state["optimizer"]
    moments = [v for p in model.parameters() for k, v in opt.state[p].items() if k != "step"]
    return [*model.parameters(), *moments]


def _kill_while_writing() -> None:
    """SIGKILL this rank as soon as it creates its first shard file (a real death mid-write)."""
    import builtins

    real_open = builtins.open

    def open_then_die(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "xb" and str(file).endswith(".distcp"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = open_then_die


def _refuse_storage_meta() -> None:
    """From here on this process's decoder does not know DCP's StorageMeta record, which DCP writes into
    every ``.metadata``: as a torch release whose metadata holds a record ckptguard does not know."""
    from torch.distributed.checkpoint import metadata

    from ckptguard.format import dcp_metadata

    del dcp_metadata._globals()[(metadata.__name__, "StorageMeta")]


def _flip_after_writing() -> None:
    """Flip a bit of each shard file this rank writes, on disk, right after the writer has closed it.

    The writer hashed the bytes it sent, so its digest is right and the file is not: media or a
    driver that changed the bytes between the write and the read-back.
    """
    import builtins

    from faultkit import flip_bit

    real_open = builtins.open

    class FlipOnClose:
        def __init__(self, file: Any, fh: Any) -> None:
            self._file, self._fh = file, fh

        def __enter__(self) -> Any:
            return self._fh.__enter__()

        def __exit__(self, *exc: Any) -> Any:
            closed = self._fh.__exit__(*exc)
            flip_bit(Path(self._file), 200)
            return closed

    def open_then_flip(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real_open(file, mode, *args, **kwargs)
        return FlipOnClose(file, fh) if mode == "xb" and str(file).endswith(".distcp") else fh

    builtins.open = open_then_flip


def _fill(disk: Path) -> None:
    """Fill the tmpfs at `disk` but for a few KiB: less than one rank's shard, more than the metadata."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - 24 * 1024))


def run_ranks(
    mode: str, run_dir: Path, world: int = 2, arg: str = "", arg2: str = "", timeout: float = 90
) -> list[Any]:
    """Run `world` ranks of `mode` to the end and return each rank's JSON report (None for a killed rank)."""
    from faultkit import launch_ranks

    cmd = [sys.executable, __file__, mode, str(run_dir), arg, arg2]
    procs = launch_ranks([cmd] * world)
    reports = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            lines = out.strip().splitlines()
            reports.append(
                json.loads(lines[-1]) if lines else {"ok": False, "exit": p.returncode, "stderr": err[-3000:]}
            )
    finally:
        for p in procs:
            p.kill()
    return reports


def resumed(run_dir: Path, world: int = 2) -> dict[str, Any]:
    """Resume `run_dir` on `world` ranks; the one report they all agree on (step, fingerprints)."""
    reports = run_ranks("resume", run_dir, world=world)
    assert all(r["ok"] for r in reports), reports
    assert all(r == reports[0] for r in reports), reports  # every rank holds the same full state
    return reports[0]


def kill_job_mid_save(run_dir: Path, steps: range, timeout: float = 60) -> int:
    """Run ``loop`` on two ranks and SIGKILL both once a shard file of a save in `steps` exists; returns that step.

    Polls the run directory: the kill lands while DCP writes into staging, before the commit.
    """
    from faultkit import launch_ranks

    cmd = [sys.executable, __file__, "loop", str(run_dir), "", ""]
    procs = launch_ranks([cmd, cmd])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for step in steps:
                if any(run_dir.glob(f".staging-checkpoint-{step}-*/sharded/*.distcp")):
                    for p in procs:
                        p.send_signal(signal.SIGKILL)
                    return step
            time.sleep(0.002)
        raise AssertionError(f"no save of steps {steps} started within {timeout}s")
    finally:
        for p in procs:
            p.kill()
            p.communicate()


if __name__ == "__main__":
    result = _main(*sys.argv[1:5])
    print(json.dumps(result), flush=True)
