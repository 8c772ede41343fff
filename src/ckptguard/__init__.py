"""ckptguard: checkpoints that end complete, durable and verified, or in a loud, typed error.

>>> from ckptguard import CheckpointManager                        # doctest: +SKIP
>>> mgr = CheckpointManager("runs/exp1", keep_last=3)               # doctest: +SKIP
>>> mgr.save(100, {"model": model, "optimizer": opt})                # doctest: +SKIP

The public names load on first use (PEP 562): importing the package, or ``ckptguard.cli.main``, does
not import torch, so ``ckptguard train`` watches SIGTERM and Ctrl-C before torch takes seconds to load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckptguard.catalog.discovery import CheckpointInfo
    from ckptguard.catalog.verify import VerifyReport, verify_checkpoint
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
    from ckptguard.run.adapter_dir import load_lora_adapters, save_lora_adapters
    from ckptguard.run.manager import CheckpointManager
    from ckptguard.run.preemption import PreemptionWatcher
    from ckptguard.run.save import SaveResult
    from ckptguard.state.restore import Restored
    from ckptguard.state.rng import RNGState
    from ckptguard.state.snapshot import estimate_bytes, per_rank

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

# the module that defines each public name (the imports above, for type checkers, say the same)
_HOMES = {
    "run.adapter_dir": "load_lora_adapters save_lora_adapters",
    "catalog.discovery": "CheckpointInfo",
    "errors": "CheckpointError CheckpointNotFoundError CoordinationError CorruptCheckpointError "
    "InsufficientSpaceError LockedError NotWritableError PreflightError UnsupportedStateError VerificationError "
    "WriteError",
    "run.manager": "CheckpointManager",
    "run.save": "SaveResult",
    "run.preemption": "PreemptionWatcher",
    "state.restore": "Restored",
    "state.rng": "RNGState",
    "state.snapshot": "estimate_bytes per_rank",
    "catalog.verify": "VerifyReport verify_checkpoint",
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names.split()}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use and keep the name here, so the next lookup is direct."""
    home = _HOME_OF.get(name)
    if home is None:
        raise AttributeError(f"module 'ckptguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ckptguard.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
