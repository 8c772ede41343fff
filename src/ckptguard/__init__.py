"""ckptguard: checkpoints that end complete, durable and verified, or in a loud, typed error.

>>> from ckptguard import CheckpointManager                        # doctest: +SKIP
>>> mgr = CheckpointManager("runs/exp1", keep_last=3)               # doctest: +SKIP
>>> mgr.save(100, {"model": model, "optimizer": opt})                # doctest: +SKIP
"""

from ckptguard.adapter_dir import load_lora_adapters, save_lora_adapters
from ckptguard.discovery import CheckpointInfo
from ckptguard.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CoordinationError,
    CorruptCheckpointError,
    InsufficientSpaceError,
    LockedError,
    NotWritableError,
    PreflightError,
    UnsupportedStateError,
    VerificationError,
    WriteError,
)
from ckptguard.manager import CheckpointManager, SaveResult
from ckptguard.preemption import PreemptionWatcher
from ckptguard.restore import Restored
from ckptguard.rng import RNGState
from ckptguard.snapshot import estimate_bytes, per_rank
from ckptguard.verify import VerifyReport, verify_checkpoint

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CoordinationError",
    "CorruptCheckpointError",
    "InsufficientSpaceError",
    "LockedError",
    "NotWritableError",
    "PreemptionWatcher",
    "PreflightError",
    "RNGState",
    "Restored",
    "SaveResult",
    "UnsupportedStateError",
    "VerificationError",
    "VerifyReport",
    "WriteError",
    "estimate_bytes",
    "load_lora_adapters",
    "per_rank",
    "save_lora_adapters",
    "verify_checkpoint",
]
