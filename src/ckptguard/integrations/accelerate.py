"""Companions to Accelerate's ``save_state`` / ``load_state`` that commit and resume only verified checkpoints.

    from ckptguard.integrations.accelerate import load_state, save_state

    accelerator = Accelerator()
    model, opt, data = accelerator.prepare(model, opt, data)
    load_state(accelerator, "runs/exp1", missing_ok=True)   # the newest verified checkpoint, if any
    for step, batch in enumerate(data, start=1):
        ...
        save_state(accelerator, "runs/exp1", step, keep_last=3)   # runs/exp1/checkpoint-{step}

``save_state`` lets ``Accelerator.save_state`` write everything it writes (models, optimizers,
schedulers, samplers, scaler, every process's RNG, registered objects) on every process into one
staging directory whose name rank 0 chose and broadcast; the main process then commits it. With
``automatic_checkpoint_naming`` the checkpoint gets Accelerate's own name, ``checkpoint_{iteration}``.
Unlike Accelerate's automatic naming, older checkpoints are deleted only after the new one is
verified, and ``load_state`` never picks an empty or torn directory. Accelerate's save counter
(``save_iteration``) is stored with the checkpoint and restored on load, which Accelerate's own
``load_state`` does not do.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

from ckptguard.dist import Coordinator
from ckptguard.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ckptguard.format.layout import ACCELERATE_ITERATION_FILE, accelerate_name, checkpoint_name
from ckptguard.format.manifest import ManifestError, parse_json
from ckptguard.integrations import staged

TIMEOUT_S = 600.0  # bound on every agreement between processes (a dead process becomes a CoordinationError)
_coordinators: weakref.WeakKeyDictionary[Any, Coordinator] = weakref.WeakKeyDictionary()


def _coordinator(accelerator: Any) -> Coordinator:
    if accelerator not in _coordinators:  # first use: every process calls this alike
        _coordinators[accelerator] = Coordinator(TIMEOUT_S)
    return _coordinators[accelerator]


def save_state(
    accelerator: Any, run_dir: str | Path, step: int | None = None, *, keep_last: int | None = None, **kwargs: Any
) -> Path:
    """``accelerator.save_state`` into `run_dir`, committed and verified; call it on every process.

    The checkpoint is ``run_dir/checkpoint-{step}``, or, where the accelerator's ``project_config`` has
    ``automatic_checkpoint_naming``, Accelerate's own ``run_dir/checkpoint_{iteration}`` (pass
    ``Path(accelerator.project_dir, "checkpoints")`` as `run_dir` for Accelerate's place too). A directory of
    that name already there (after loading an older checkpoint, or a save counter set back by hand) is moved
    aside to ``NAME.superseded-<time>`` when the new one commits, never overwritten. `step` (recorded in the
    manifest) defaults to Accelerate's save counter. `keep_last` deletes the oldest verified checkpoints, by save
    order, beyond that many, after the commit; left out, it is ``project_config.total_limit`` where
    ``automatic_checkpoint_naming`` is on, as Accelerate applies it. `kwargs` go to ``Accelerator.save_state``.
    Returns the checkpoint's path; a failure on any process raises the same CheckpointError on every process,
    and leaves the save counter where it was, so the next save takes the same name.
    """
    run_dir = Path(run_dir)
    config = accelerator.project_configuration
    iteration = accelerator.save_iteration
    step = iteration if step is None else step
    automatic = config.automatic_checkpoint_naming
    name = accelerate_name(iteration) if automatic else checkpoint_name(step)
    coord = _coordinator(accelerator)
    save = staged.begin(coord, run_dir, step, name)
    if keep_last is None and automatic:
        keep_last = config.total_limit
    config.automatic_checkpoint_naming = False  # ours names it, and deletes only after the commit
    error: CheckpointError | None = None
    try:
        accelerator.save_state(str(save.path), **kwargs)
        if coord.is_primary:
            (save.path / ACCELERATE_ITERATION_FILE).write_text(json.dumps({"iteration": iteration}))
    except Exception as exc:  # any failure on any process must reach every process as one typed error
        error = staged.write_error(exc, save.path, step)
    finally:
        config.automatic_checkpoint_naming = automatic
    try:
        target = staged.finish(save, error)
    except CheckpointError:
        config.iteration = iteration  # Accelerate counted a save that did not happen
        raise
    coord.on_primary(lambda: staged.rotate(run_dir, keep_last), step=step)
    return target


def load_state(
    accelerator: Any, run_dir: str | Path, path: str | Path | None = None, *, missing_ok: bool = False, **kwargs: Any
) -> Path | None:
    """Load the newest verified checkpoint of `run_dir` (or exactly `path`, verified first); call it on every process.

    Returns the checkpoint loaded, or None when `run_dir` holds no verified checkpoint. A `run_dir` that
    does not exist is CheckpointNotFoundError unless `missing_ok` (a first start): a typo in it would
    otherwise start training from scratch without a word. Accelerate's save counter continues after the
    loaded checkpoint's.

    Call it before step 1 (with `missing_ok` on a first start): it is also the run's preflight, as
    CheckpointManager's: `run_dir` is locked for this process (a second job on it gets LockedError) and
    probed with a real write on every process, and what a killed save left is removed under the lock.
    """
    run_dir, coord = Path(run_dir), _coordinator(accelerator)
    if path is None and not coord.on_primary(lambda: run_dir.is_dir()) and not missing_ok:
        raise CheckpointNotFoundError(
            "the run directory to resume from does not exist",
            path=run_dir,
            remedy="Check the path for a typo, or pass missing_ok=True on a first start.",
        )
    staged.ensure_open(coord, run_dir)

    def choose() -> str | None:
        found = staged.require_verified(path) if path is not None else staged.newest_verified(run_dir)
        return str(found) if found is not None else None

    chosen = coord.on_primary(choose)
    if chosen is None:
        return None
    iteration = _saved_iteration(Path(chosen))  # before loading: a checkpoint refused here changes nothing
    accelerator.load_state(chosen, **kwargs)
    accelerator.project_configuration.iteration = iteration + 1
    return Path(chosen)


def _saved_iteration(checkpoint: Path) -> int:
    try:
        doc = parse_json((checkpoint / ACCELERATE_ITERATION_FILE).read_bytes(), ACCELERATE_ITERATION_FILE)
    except (OSError, ManifestError) as exc:
        raise CorruptCheckpointError(f"cannot read {ACCELERATE_ITERATION_FILE}: {exc}", path=checkpoint) from exc
    iteration = doc.get("iteration") if isinstance(doc, dict) else None
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise CorruptCheckpointError(f"{ACCELERATE_ITERATION_FILE} holds no iteration count", path=checkpoint)
    return iteration
