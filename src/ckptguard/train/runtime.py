"""Where the trainer runs: device, process group, precision and seeds.

Kept apart from the recipe so the training loop reads as training, not as plumbing.
"""

from __future__ import annotations

import datetime
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ckptguard.dist import job_store
from ckptguard.train.config import ConfigError


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run: rank, world size, device, and whether bf16 autocast is on."""

    rank: int
    world_size: int
    device: torch.device
    bf16: bool
    owns_process_group: bool
    strategy: str = "ddp"

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def autocast(self) -> Any:
        """bf16 autocast for the forward pass where chosen; the optimizer and loss sums stay fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum small numbers over ranks (one collective; a no-op on one process)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def start(device: str, precision: str, timeout_s: float, strategy: str = "ddp") -> Runtime:
    """Join the process group torchrun describes (RANK/WORLD_SIZE in the environment), pick the device.

    gloo on CPU, NCCL on GPU. A process group the caller already initialised is used as it is.
    FSDP needs a process group even on one process (a checkpoint saved by 2 ranks resumes on 1).
    """
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was asked for but torch sees no CUDA device; use 'auto' or 'cpu'")
    owns = False
    if strategy == "fsdp" and "MASTER_ADDR" not in os.environ and not dist.is_initialized():
        raise ConfigError(
            'train.strategy: "fsdp" runs under torchrun (e.g. torchrun --nproc_per_node=2 -m ckptguard.train)'
        )
    grouped = int(os.environ.get("WORLD_SIZE", "1")) > 1 or strategy == "fsdp"
    if grouped and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    dev = torch.device("cuda", torch.cuda.current_device()) if want_cuda else torch.device("cpu")
    auto_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    bf16 = auto_bf16 if precision == "auto" else precision == "bf16"
    return Runtime(rank, world, dev, bf16, owns, strategy)


def distribute(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """The module the forward goes through: DDP (replicas, gradients averaged) or FSDP2 shards.

    FSDP2 gets an explicit mesh on the run's device: left to itself, it picks CUDA whenever a GPU
    is visible, even for a gloo run on CPU (pytorch #132471). Each decoder layer is its own unit, so
    only one layer's full weights exist at a time; the model itself is wrapped in place.
    """
    if rt.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(rt.device.type, (rt.world_size,))
        for module in model.modules():
            if isinstance(module, torch.nn.ModuleList) and module is not model:
                for layer in module:
                    fully_shard(layer, mesh=mesh)
                break
        return fully_shard(model, mesh=mesh)
    if rt.world_size > 1:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


@contextmanager
def gradient_sync(module: torch.nn.Module, rt: Runtime, sync: bool) -> Iterator[None]:
    """Average gradients over ranks in this backward only when `sync` (the last micro-batch of a step)."""
    if rt.strategy == "fsdp":
        module.set_requires_gradient_sync(sync)  # type: ignore[operator]
        yield
    elif rt.world_size > 1 and not sync:
        with module.no_sync():  # type: ignore[operator]
            yield
    else:
        yield


def scalar(value: torch.Tensor) -> float:
    """A number from a tensor that may be a DTensor (FSDP's gradient norm is one): the full value."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


def stop(rt: Runtime) -> None:
    """Leave the process group. Rank 0 leaves last: without torchrun it hosts the job's store, and a
    rank still tearing its group down when that store vanishes can abort ("terminate called
    without an active exception") after its error was already reported, turning exit 1 into 134."""
    if not (rt.owns_process_group and dist.is_initialized()):
        return
    store = job_store() if rt.world_size > 1 else None
    dist.destroy_process_group()
    if store is None:
        return
    try:
        if rt.rank != 0:
            store.add(_LEFT_KEY, 1)
            return
        deadline = time.monotonic() + _LEAVE_WAIT_S
        while store.add(_LEFT_KEY, 0) < rt.world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    except RuntimeError:  # a rank (or the store) is gone already: nothing left to wait for
        pass


_LEFT_KEY = "ckptguard/left_process_group"
_LEAVE_WAIT_S = 10.0  # bounded: a rank that died never says it left


def seed_everything(seed: int) -> None:
    """Seed every global stream (python, numpy, torch CPU and CUDA) that a training step may draw from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
