"""A Lightning ``CheckpointIO`` whose every checkpoint is committed through the publish path and verified on load.

    import lightning.pytorch as pl
    from ckptguard.integrations.lightning import VerifiedCheckpointIO

    trainer = pl.Trainer(plugins=[VerifiedCheckpointIO()],
                         callbacks=[pl.callbacks.ModelCheckpoint("runs/pl", save_last=True)])
    trainer.fit(module, ckpt_path="last")    # loads only a checkpoint whose every byte verifies

Each checkpoint Lightning names (``runs/pl/epoch=0-step=100.ckpt``, ``last.ckpt``) becomes a directory of
that name holding ``checkpoint.pt`` (Lightning's own ``torch.save`` of its checkpoint dict) and a
manifest; it appears under its name only complete, fsynced and verified, so ``ckpt_path="last"``
never resolves to a torn file. A checkpoint saved again under the same name (``last.ckpt``) replaces
the old one only once the new one is verified. Loading verifies first (CorruptCheckpointError
otherwise). A removal Lightning asks for waits until no save is in flight, so with
``AsyncCheckpointIO(VerifiedCheckpointIO())`` the previous checkpoint is never deleted while the newer
one is still being written, and is kept if that save failed.

Lightning calls ``CheckpointIO`` on global rank 0 only, so this plugin needs no agreement between
ranks. Sharded strategies (FSDP with sharded state, DeepSpeed) write their checkpoints without
``CheckpointIO``: :func:`check_strategy` refuses them with a clear error.
"""

from __future__ import annotations

import glob
import logging
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from ckptguard import publish
from ckptguard.errors import UnsupportedStateError
from ckptguard.integrations import staged
from ckptguard.layout import SUPERSEDED_MARK
from ckptguard.verify import verify_checkpoint

log = logging.getLogger("ckptguard")

PAYLOAD = "checkpoint.pt"  # Lightning's checkpoint dict, as Lightning's own torch.save writes it


class VerifiedCheckpointIO(CheckpointIO):
    """Saves through :func:`ckptguard.integrations.staged.commit`; loads only what verifies."""

    def __init__(self) -> None:
        self._in_flight = 0
        self._failed = False  # the newest save failed: keep what Lightning would delete after it
        self._idle = threading.Condition()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("VerifiedCheckpointIO takes no storage_options")
        target = Path(path)
        step = int(checkpoint.get("global_step", 0))
        with self._idle:
            self._in_flight += 1
        ok = False
        try:
            self._save(checkpoint, target, step)
            ok = True
        finally:
            with self._idle:
                self._in_flight -= 1
                self._failed = not ok
                self._idle.notify_all()

    def _save(self, checkpoint: dict[str, Any], target: Path, step: int) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = publish.create_staging(target.parent, target.name)
        try:
            with open(staging / PAYLOAD, "wb") as fh:  # a Python file, so a full disk is an OSError with its errno
                torch.save(checkpoint, fh)
        except Exception as exc:
            publish.discard_staging(staging)
            raise staged.write_error(exc, staging / PAYLOAD, step) from exc
        staged.commit(staging, target, step)
        for old in glob.glob(glob.escape(str(target)) + SUPERSEDED_MARK + "*"):  # the same name saved before
            publish.remove(Path(old))

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        from lightning.fabric.utilities.cloud_io import _load

        checked = staged.require_verified(path)
        return _load(checked / PAYLOAD, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0)
            if self._failed:
                log.warning("keeping %s: the newer save failed", path)
                return
        if Path(path).is_dir():
            publish.remove(Path(path))

    def teardown(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0)


def newest_verified_ckpt(dirpath: str | Path) -> str | None:
    """The checkpoint in `dirpath` with the highest step (then the newest) that passes full verification.

    For ``trainer.fit(module, ckpt_path=newest_verified_ckpt(dirpath))``. Unlike ``ckpt_path="last"``,
    it also finds the previous ``last.ckpt`` when a kill landed between moving it aside and publishing
    its replacement (``last.ckpt.superseded-*``), and it skips a damaged checkpoint for the one before.
    """
    found = []
    for entry in Path(dirpath).iterdir() if Path(dirpath).is_dir() else []:
        if entry.name.startswith((".staging-", ".trash-")) or not (entry / PAYLOAD).is_file():
            continue
        report = verify_checkpoint(entry, staged.LEVEL)
        if report.ok and report.manifest is not None:
            found.append((report.manifest.step or 0, report.manifest.created, str(entry)))
        else:
            log.warning("not resuming from %s: %s", entry, report.reason)
    return max(found)[2] if found else None


def check_strategy(trainer: Any) -> None:
    """Raise UnsupportedStateError when `trainer`'s strategy saves sharded checkpoints, bypassing CheckpointIO."""
    strategy = trainer.strategy
    sharded = getattr(strategy, "_state_dict_type", None) == "sharded" or "deepspeed" in type(strategy).__name__.lower()
    if sharded:
        raise UnsupportedStateError(
            f"{type(strategy).__name__} writes sharded checkpoints without CheckpointIO, so VerifiedCheckpointIO "
            "cannot commit or verify them",
            remedy="Use a strategy with full state dicts (DDP, or FSDP with state_dict_type='full').",
        )
