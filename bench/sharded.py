"""Sharded (FSDP2) saves: ckptguard against plain DCP, two gloo ranks on CPU, in the same run.

    .venv/bin/python bench/sharded.py [--reps 5] [--mib 256] [--verify full] [--out bench/results]

Throughput: ``CheckpointManager.save`` of an FSDP2 model and its AdamW state (DCP underneath,
every byte hashed as written, manifest, commit, full re-read verification) against
``dcp.save`` with a plain ``FileSystemWriter`` (which fsyncs but neither hashes nor verifies) of
the same state dict, keeping one checkpoint as the manager does (``keep_last=1``). Target: >= 0.9x
its throughput (``--verify quick`` shows what the re-read takes). Stall: what the training loop
waits for ``save(blocking=False)`` against ``dcp.async_save`` (each then waited for). Target: <= 0.25x.
Alternated, medians over `reps`. Writes sharded.md and prints it. Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

THROUGHPUT_TARGET, STALL_TARGET = 0.9, 0.25


def _rank(out_dir: str, reps: int, mib: int, verify: str) -> dict[str, list[float]]:
    """One rank: build, shard, step once, then time both saves alternately (every rank times alike)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ckptguard import CheckpointManager
    from ckptguard.commit import publish

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    width = 1024
    layers = max(1, mib * (1 << 20) // (3 * 4 * width * width))  # weights + two AdamW moments
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    root = Path(out_dir)
    mgr = CheckpointManager(root / "guard", keep_last=1, verify=verify)
    state = {"model": model, "optimizer": opt}
    times: dict[str, list[float]] = {"dcp": [], "guard": [], "dcp_async_stall": [], "guard_async_stall": []}

    def plain() -> dict[str, Any]:  # the same state dict ckptguard saves: {"model": ..., "optimizer": ...}
        return dict(zip(("model", "optimizer"), get_state_dict(model, opt), strict=True))

    for rep in range(reps):
        writer = _plain(root, rep, "s")
        times["dcp"].append(_timed(lambda: dcp.save(plain(), storage_writer=writer)))  # noqa: B023 - called at once
        _drop(root, rep - 1, "s")
        step = 2 * rep + 1
        times["guard"].append(_timed(lambda: mgr.save(step, state)))  # noqa: B023 - called at once
        publish.wait_for_removals()  # the checkpoint retention removed is freed untimed, as the baseline's
        writer = _plain(root, rep, "a")
        start = time.perf_counter()
        future = dcp.async_save(plain(), storage_writer=writer)
        times["dcp_async_stall"].append(time.perf_counter() - start)
        future.result()
        _drop(root, rep - 1, "a")
        start = time.perf_counter()
        mgr.save(2 * rep + 2, state, blocking=False)
        times["guard_async_stall"].append(time.perf_counter() - start)
        mgr.wait()
        publish.wait_for_removals()
    mgr.close()
    return times


def _plain(root: Path, rep: int, kind: str) -> Any:
    """A writer into a new directory (the baseline's checkpoint of this repeat)."""
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(root / f"dcp-{kind}-{rep}", overwrite=False)


def _drop(root: Path, rep: int, kind: str) -> None:
    """Delete the baseline's previous checkpoint once the new one is written, untimed, as keep_last=1 does.

    Each side deletes after it writes (the manager prunes after its commit; its background deletion
    is waited for untimed), so each side's write follows the other's deletion: on the development
    machine's disk (ext4, online discard) a write right after a deletion is faster than one that grows
    the disk, and a baseline that deleted just before its own write had that advantage to itself.
    """
    import torch.distributed as dist

    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(root / f"dcp-{kind}-{rep}", ignore_errors=True)
    dist.barrier()


def _timed(fn: Any) -> float:
    import torch.distributed as dist

    dist.barrier()  # both ranks start together; the slower rank's time is the save's
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def run(reps: int, mib: int, verify: str) -> dict[str, Any]:
    """Two ranks on a fresh temporary directory; returns rank 0's timings and the state's size."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from faultkit import launch_ranks

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        cmd = [sys.executable, __file__, "--rank", tmp, "--reps", str(reps), "--mib", str(mib), "--verify", verify]
        procs = launch_ranks([cmd, cmd])
        outs = [p.communicate(timeout=1800) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            if p.returncode != 0:
                raise SystemExit(f"a rank failed:\n{err[-3000:]}")
        nbytes = sum(f.stat().st_size for f in Path(tmp, f"dcp-s-{reps - 1}").iterdir())
        shutil.rmtree(tmp, ignore_errors=True)
    return {"times": json.loads(outs[0][0].strip().splitlines()[-1]), "bytes": nbytes}


def report(result: dict[str, Any], reps: int, verify: str) -> str:
    med = {k: statistics.median(v) for k, v in result["times"].items()}
    mib = result["bytes"] / (1 << 20)
    throughput = med["dcp"] / med["guard"]
    stall = med["guard_async_stall"] / med["dcp_async_stall"]
    rows = [
        ("dcp.save, FileSystemWriter", med["dcp"], f"{mib / med['dcp']:.0f} MiB/s"),
        (f"CheckpointManager.save (hash, manifest, verify={verify})", med["guard"], f"{mib / med['guard']:.0f} MiB/s"),
        ("dcp.async_save: stall", med["dcp_async_stall"], ""),
        ("save(blocking=False): stall", med["guard_async_stall"], ""),
    ]
    lines = [
        f"## Sharded saves: 2 gloo ranks, FSDP2, {mib:.0f} MiB per checkpoint, median of {reps}",
        "",
        "| save | seconds | throughput |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {sec:.3f} | {tp} |" for name, sec, tp in rows),
        "",
        f"Throughput ratio (ckptguard / DCP): {throughput:.2f}x (target >= {THROUGHPUT_TARGET}x): "
        f"{'met' if throughput >= THROUGHPUT_TARGET else 'MISSED'}",
        f"Stall ratio (ckptguard / dcp.async_save): {stall:.2f}x (target <= {STALL_TARGET}x): "
        f"{'met' if stall <= STALL_TARGET else 'MISSED'}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mib", type=int, default=256, help="size of one checkpoint (weights and AdamW moments)")
    parser.add_argument("--verify", choices=("quick", "full"), default="full")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--rank", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        print(json.dumps(_rank(args.rank, args.reps, args.mib, args.verify)), flush=True)
        return
    text = report(run(args.reps, args.mib, args.verify), args.reps, args.verify)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharded.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
