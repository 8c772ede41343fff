"""A Lightning ``CheckpointIO`` whose every checkpoint is committed through the publish path and verified on load.

    import lightning.pytorch as pl
    from ckptguard.integrations.lightning import VerifiedCheckpointIO

    trainer = pl.Trainer(plugins=[VerifiedCheckpointIO()],
                         callbacks=[pl.callbacks.ModelCheckpoint("runs/pl", save_last=True)])
    trainer.fit(module, ckpt_path="last")    # loads only a checkpoint whose every byte verifies

Each checkpoint Lightning names (``runs/pl/epoch=0-step=100.ckpt``, ``last.ckpt``) stays one file,
Lightning's own ``torch.save`` archive with ckptguard's manifest as one more record inside it
(:mod:`ckptguard.format.ckpt_file`), committed by :class:`ckptguard.commit.file_publish.FileCommitter`: it
appears under its name only complete, fsynced and verified, so ``ckpt_path="last"`` never resolves to a
torn file, and a checkpoint saved again under the same name (``last.ckpt``) replaces the old one in one
rename. ``torch.load`` reads it unchanged. Loading verifies first (CorruptCheckpointError otherwise),
through the plugin and through Lightning's own ``MyModule.load_from_checkpoint``. A removal
Lightning asks for waits until no save is in flight, is kept if the newest save failed, and frees its
space before it returns. With ``AsyncCheckpointIO(VerifiedCheckpointIO())`` a save counts from the moment it is
submitted: the removal Lightning asks for right after submitting it is queued on the same worker,
behind that save, so the previous checkpoint is never deleted before the newer one commits (or at all,
if it failed).

Lightning adds :class:`LightningGuard` to every Trainer through the ``lightning.pytorch.callbacks_factory``
entry point ckptguard installs (:func:`lightning_callbacks`); it does nothing for a Trainer without
this plugin. With it, it does what Lightning offers the plugin no hook for:

- Before the first step of ``fit``, each ModelCheckpoint directory is opened the way CheckpointManager
  opens a run directory (:func:`ckptguard.integrations.staged.open_run`): rank 0 takes its run lock (a
  second job on it gets LockedError) and removes what killed saves left there, and every rank probes
  it with a real write; the lock is released at teardown. The lock, its owner and events.jsonl live beside
  the directory (:func:`own_files`), so it lists Lightning's checkpoints alone. An fsspec URL as dirpath
  is refused there too.
- Strategies that save or load their own way (FSDP, DeepSpeed, ModelParallelStrategy, XLA) go around
  ``CheckpointIO``, so this plugin would never see their checkpoints: they are refused with an
  UnsupportedStateError in ``setup``, before the first step.
- Lightning calls ``CheckpointIO`` on global rank 0 only, and every rank then waits in a barrier:
  an error raised there would strand the other ranks. With more than one rank, during training,
  the plugin holds a failed save's error (writing and removing nothing more), and the guard raises
  it on every rank, the same type on each, at the next hook all ranks pass (the next batch, epoch,
  validation or the end of training). Older checkpoints stay as they were. A save outside training
  (``trainer.save_checkpoint`` after ``fit``) raises on rank 0 at once.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import Strategy

from ckptguard.catalog.verify import UNVERIFIABLE_FILE, verify_checkpoint
from ckptguard.commit import publish
from ckptguard.dist import Coordinator
from ckptguard.errors import CheckpointError, CorruptCheckpointError, UnsupportedStateError
from ckptguard.files.events import EventLog
from ckptguard.format.layout import lightning_name, side_dir_name
from ckptguard.integrations import staged

log = logging.getLogger("ckptguard")

TIMEOUT_S = 600.0  # bound on the ranks' agreement on a save (a dead rank becomes a CoordinationError)


class VerifiedCheckpointIO(CheckpointIO):
    """Saves through :func:`ckptguard.integrations.staged.begin_alone` and `finish`; loads only what verifies."""

    def __init__(self) -> None:
        self._in_flight = 0
        self._failed = False  # the newest save failed: keep what Lightning would delete after it
        self._idle = threading.Condition()
        self.hold_errors = False  # set by LightningGuard when there is more than one rank
        self._held: CheckpointError | None = None
        self.queue: Any | None = None  # the AsyncCheckpointIO around this plugin; set by LightningGuard

    def __getstate__(self) -> dict[str, Any]:
        """A copy for ``ddp_spawn``, ``deepcopy`` or ``torch.save(trainer)``: no lock, no save in flight, and
        no async worker (LightningGuard finds it again at setup)."""
        state = self.__dict__.copy()
        del state["_idle"]
        return state | {"_in_flight": 0, "queue": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _idle=threading.Condition())

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("VerifiedCheckpointIO takes no storage_options")
        refuse_url(path)
        if self._held is not None:  # a failed save waits to be raised on every rank: write nothing more
            return
        target = Path(path)
        step = int(checkpoint.get("global_step", 0))
        with self._idle:
            self._in_flight += 1
        ok = False
        try:
            self._save(checkpoint, target, step)
            ok = True
        except Exception as exc:
            if not self.hold_errors:
                raise
            self._held = staged.write_error(exc, target, step)
            log.error("save of step %d failed; raised on every rank at the next hook: %s", step, self._held)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._failed = not ok
                self._idle.notify_all()

    def _save(self, checkpoint: dict[str, Any], target: Path, step: int) -> None:
        save = staged.begin_file(target, step, EventLog(own_files(target.parent)))
        error: CheckpointError | None = None
        try:
            with open(save.path, "wb") as fh:  # a Python file: a full disk is an OSError
                torch.save(checkpoint, fh)
        except Exception as exc:
            error = staged.write_error(exc, save.path, step)
        staged.finish(save, error)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        from lightning.fabric.utilities.cloud_io import _load

        checked = staged.require_verified(linked(path))
        return _load(checked, map_location=map_location, weights_only=weights_only)

    def take_held(self) -> CheckpointError | None:
        """The failed save's error held for the ranks to raise together (then no longer held)."""
        held, self._held = self._held, None
        return held

    def remove_checkpoint(self, path: Any) -> None:
        executor = getattr(self.queue, "_executor", None)
        if executor is not None:  # its one worker runs saves in order: this runs after every save submitted so far
            executor.submit(self._remove_queued, path)
            return
        self._remove(path)

    def _remove_queued(self, path: Any) -> None:
        """A removal on the async worker; its error is raised by AsyncCheckpointIO like a failed save's."""
        try:
            self._remove(path)
        except BaseException as exc:
            self.queue._error = exc

    def _remove(self, path: Any) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0)
            if self._failed:
                log.warning("keeping %s: the newer save failed", path)
                return
        if os.path.lexists(path):  # freed before returning, as Lightning's own removal: Lightning has no end-of-run
            publish.remove(Path(path), wait=True)  # hook after its last one (ddp_spawn removes after teardown)

    def teardown(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0)


def _verify_in_lightnings_loader() -> None:
    """Make Lightning's own ``load_from_checkpoint`` (LightningModule and LightningDataModule) verify these checkpoints.

    Both hand the path to ``lightning.pytorch.core.saving.pl_load``. Wrapped once, at import (Lightning
    imports this module for every Trainer, through the entry point): a local file holding a manifest is
    verified first (CorruptCheckpointError naming the record otherwise); a file without one (saved by
    plain Lightning), URLs and buffers go to Lightning's loader as before: the user asked for that file.
    Lightning's name is checked by the tests, as HF's hooks are.
    """
    from lightning.pytorch.core import saving

    plain = saving.pl_load
    if getattr(plain, "ckptguard_verifies", False):
        return

    @functools.wraps(plain)
    def pl_load(path_or_url: Any, *args: Any, **kwargs: Any) -> Any:
        local = isinstance(path_or_url, (str, os.PathLike)) and "://" not in str(path_or_url)
        if local and os.path.isfile(path_or_url):
            report = verify_checkpoint(linked(path_or_url), staged.LEVEL)
            if not report.ok and report.problems[0].reason != UNVERIFIABLE_FILE:
                why = f"refusing to load an unverified checkpoint ({report.reason})"
                raise CorruptCheckpointError(why, path=path_or_url)
        return plain(path_or_url, *args, **kwargs)

    pl_load.ckptguard_verifies = True  # type: ignore[attr-defined]
    saving.pl_load = pl_load


_verify_in_lightnings_loader()


def load_from_checkpoint(cls: type[Any], path: str | Path, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path, **kwargs)`` for a checkpoint this plugin saved, verified first.

    ``load_from_checkpoint(MyModule, "runs/pl/last.ckpt")`` checks every byte against the manifest
    (CorruptCheckpointError, also for a file saved without ckptguard; CheckpointNotFoundError for a wrong
    path) and then loads it, whether or not Lightning's own loader was wrapped
    (:func:`_verify_in_lightnings_loader`). `cls` is a LightningModule or LightningDataModule class.
    """
    return cls.load_from_checkpoint(staged.require_verified(linked(path)), **kwargs)


def linked(path: Any) -> Any:
    """The checkpoint a ``save_last="link"`` link names, when `path` is one to a file in its own directory; else `path`.

    Lightning makes ``last.ckpt`` a relative link to the newest checkpoint file; what is verified and loaded
    is that file. A link leaving the directory is left as it is, and so refused as not a checkpoint."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.islink(path):
        return path
    target = Path(path).resolve()
    return target if target.parent == Path(path).absolute().parent.resolve() else path


def own_files(dirpath: Path) -> Path:
    """Where the run's lock, owner and events.jsonl of the ModelCheckpoint directory `dirpath` go: beside it,
    so that listing it shows Lightning's checkpoints alone."""
    absolute = dirpath.absolute()
    return absolute.parent / side_dir_name(absolute.name)


def refuse_url(path: Any) -> None:
    """An fsspec URL (``s3://``, ``memory://``) would become a local relative folder (``Path`` drops a slash)."""
    if "://" in str(path):
        raise UnsupportedStateError(
            f"VerifiedCheckpointIO saves to local (or mounted) directories only, not to the URL {path}",
            path=str(path),
            remedy="Give ModelCheckpoint a local dirpath; for object storage, mirror that directory to a bucket "
            "(README, object storage).",
        )


def check_checkpoint_callbacks(trainer: Any) -> list[Path]:
    """The directories `trainer`'s ModelCheckpoint callbacks save into, once each; refuse an fsspec URL.

    ``save_last="link"`` is allowed: Lightning replaces the link ``last.ckpt`` itself, but a link holds no
    data; what it names is a committed checkpoint file, verified when loaded through it (:func:`linked`).
    """
    dirs: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath is not None:
            refuse_url(dirpath)
            if Path(dirpath).absolute() not in dirs:
                dirs.append(Path(dirpath).absolute())
    return dirs


def newest_verified_ckpt(dirpath: str | Path) -> str | None:
    """The checkpoint in `dirpath` with the highest step (then the newest) that passes full verification.

    For ``trainer.fit(module, ckpt_path=newest_verified_ckpt(dirpath))``. Unlike ``ckpt_path="last"``,
    it skips a damaged checkpoint (and a file saved without ckptguard) for the one before.
    """
    found = []
    for entry in Path(dirpath).iterdir() if Path(dirpath).is_dir() else []:
        if not lightning_name(entry.name) or entry.is_symlink() or not entry.is_file():
            continue
        report = verify_checkpoint(entry, staged.LEVEL)
        if report.ok and report.manifest is not None:
            found.append((report.manifest.step or 0, report.manifest.created, str(entry)))
        else:
            log.warning("not resuming from %s: %s", entry, report.reason)
    return max(found)[2] if found else None


def check_strategy(trainer: Any) -> None:
    """Raise UnsupportedStateError when `trainer`'s strategy saves or loads checkpoints without CheckpointIO.

    Only ``Strategy``'s own ``save_checkpoint``/``load_checkpoint`` hand the checkpoint to CheckpointIO;
    a strategy that replaces either writes (or reads) files this plugin never sees. FSDP does so even
    with full state dicts: it refuses to save over a checkpoint directory and loads only files.
    """
    strategy = trainer.strategy
    own = [m for m in ("save_checkpoint", "load_checkpoint") if getattr(type(strategy), m) is not getattr(Strategy, m)]
    if own:
        raise UnsupportedStateError(
            f"{type(strategy).__name__} replaces Strategy.{own[0]}: it saves or loads checkpoints without "
            "CheckpointIO, so VerifiedCheckpointIO could not commit or verify them",
            remedy="Use a strategy that saves through CheckpointIO (single device, DDP), or drop VerifiedCheckpointIO.",
        )


def _verified_io(strategy: Any) -> VerifiedCheckpointIO | None:
    """The VerifiedCheckpointIO `strategy` was given, directly or inside a wrapper (AsyncCheckpointIO).

    Its removals are queued behind the saves of the innermost AsyncCheckpointIO around it."""
    from lightning.pytorch.plugins import AsyncCheckpointIO

    io = getattr(strategy, "_checkpoint_io", None)  # not the property: it installs a default plugin when unset
    queue = None
    while io is not None and not isinstance(io, VerifiedCheckpointIO):
        queue = io if isinstance(io, AsyncCheckpointIO) else queue
        io = getattr(io, "_checkpoint_io", None)
    if io is not None:
        io.queue = queue
    return io


class LightningGuard(Callback):
    """Refuses a strategy that would go around VerifiedCheckpointIO, and raises a failed save on every rank.

    The saves Lightning makes through ModelCheckpoint are counted on every rank (``on_save_checkpoint``);
    after one, the next hook every rank passes is where they agree on its outcome: one collective per save.
    """

    def __init__(self) -> None:
        self._io: VerifiedCheckpointIO | None = None
        self._coord: Coordinator | None = None
        self._unsettled: int | None = None  # the step of a save whose outcome the ranks have not agreed on
        self._opened: list[Path] = []  # the checkpoint directories this fit holds (run lock, on rank 0)

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``deepcopy(trainer.callbacks)``, ``torch.save(trainer)``) holds no run lock and no process
        group: its teardown must not release the original's lock; its own setup finds the plugin again."""
        return self.__dict__ | {"_io": None, "_coord": None, "_unsettled": None, "_opened": []}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._io = _verified_io(trainer.strategy)
        if self._io is None:
            return
        check_strategy(trainer)
        if trainer.world_size > 1 and self._coord is None:
            self._coord = Coordinator(TIMEOUT_S)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Lock, probe and clean every checkpoint directory before the sanity check and the first step."""
        if self._io is None:
            return
        coord = self._coord or Coordinator(TIMEOUT_S)
        for run_dir in check_checkpoint_callbacks(trainer):
            staged.open_run(coord, run_dir, own_files=own_files(run_dir))
            self._opened.append(run_dir)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close_runs()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close_runs()  # Lightning calls no teardown hook after an exception

    def _close_runs(self) -> None:
        """Release the run locks on_fit_start took, so a later fit in this process opens (and cleans) them again."""
        if not self._opened:
            return
        coord = self._coord or Coordinator(TIMEOUT_S)
        while self._opened:
            staged.close_run(coord, self._opened.pop())

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._io is not None and self._coord is not None:  # from here on, a hook follows every save
            self._io.hold_errors = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._settle()
        if self._io is not None:  # a save after training (trainer.save_checkpoint) raises on rank 0 at once
            self._io.hold_errors = False

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self._coord is not None:
            self._unsettled = trainer.global_step

    def _settle(self, *_: Any) -> None:
        """Every rank raises the failed save's error, or none does."""
        if self._coord is None or self._io is None or self._unsettled is None:
            return
        step, self._unsettled = self._unsettled, None
        self._coord.agree(self._io.take_held() if self._coord.is_primary else None, None, step=step)

    on_train_batch_start = on_train_epoch_start = on_train_epoch_end = on_validation_start = _settle


def lightning_callbacks() -> list[Callback]:
    """The ``lightning.pytorch.callbacks_factory`` entry point: Lightning adds these to every Trainer."""
    return [LightningGuard()]
