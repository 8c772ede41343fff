"""Hugging Face ``Trainer`` whose every checkpoint is staged, committed by one process, verified, then published.

    from transformers import Trainer
    from ckptguard.integrations.hf import CheckpointGuardMixin, newest_verified_checkpoint

    class GuardedTrainer(CheckpointGuardMixin, Trainer): ...
    trainer = GuardedTrainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=True)      # the newest *verified* checkpoint, never a torn one

transformers has no public hook for where a checkpoint is written, so this overrides two private
methods, ``Trainer._save_checkpoint`` and ``Trainer._get_output_dir`` (tested with the range pinned in
the ``hf`` extra; importing this module fails loudly if either is gone). During a save,
``_get_output_dir`` names a staging directory that rank 0 created and broadcast, so HF's own
``_save_checkpoint`` (model, optimizer, scheduler, RNG of every rank, trainer state) and its JIT
(SIGTERM) checkpoint write there, on every rank; :mod:`ckptguard.integrations.staged` then commits it.
HF's own deletions would go around the commit protocol, so HF is shown no ``save_total_limit`` while it
trains (its rotation, and with a limit of 1 its end-of-training ``rmtree`` of the newest checkpoint,
which left LATEST naming a deleted directory); the limit is applied after each commit, through the
publish path, keeping what HF's rotation keeps: the newest `limit`, or the best and the newest
``limit - 1`` (at least the newest) when the best is older (:func:`ckptguard.integrations.staged.rotate`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from transformers import Trainer

from ckptguard.commit.publish import remove
from ckptguard.dist import Coordinator
from ckptguard.errors import CheckpointError, CheckpointNotFoundError, UnsupportedStateError
from ckptguard.format.layout import checkpoint_name
from ckptguard.integrations import staged

for _name in ("_save_checkpoint", "_get_output_dir"):
    if not callable(getattr(Trainer, _name, None)):  # the private hooks this module overrides
        raise ImportError(
            f"transformers.Trainer.{_name} is gone in this transformers version; ckptguard.integrations.hf "
            "supports the range in ckptguard's `hf` extra"
        )

TRAINER_STATE_NAME = "trainer_state.json"
JIT_SENTINEL = "checkpoint-is-incomplete.txt"  # HF's JIT save creates checkpoint-N/<this> before saving


def newest_verified_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint under `output_dir` whose every byte matches its manifest, or None.

    For ``trainer.train(resume_from_checkpoint=newest_verified_checkpoint(out))``: resume if there is one.
    """
    found = staged.newest_verified(output_dir)
    return str(found) if found is not None else None


class CheckpointGuardMixin:
    """Put before ``Trainer`` in the bases: ``class GuardedTrainer(CheckpointGuardMixin, Trainer)``.

    `ckptguard_timeout_s` bounds every agreement between ranks (a dead rank becomes a CoordinationError).
    """

    ckptguard_timeout_s: float = 600.0
    _ckptguard_staging: Path | None = None
    _ckptguard_coord: Coordinator | None = None
    _ckptguard_args: Any = None  # the caller's TrainingArguments, while HF is shown a copy without save_total_limit

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse ``class T(Trainer, CheckpointGuardMixin)``: Trainer's own save would win and every
        checkpoint would be a plain, unguarded one, without a word."""
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if Trainer in mro and mro.index(Trainer) < mro.index(CheckpointGuardMixin):
            raise TypeError(
                f"{cls.__name__} puts Trainer before CheckpointGuardMixin in its bases, so Trainer's own save "
                f"would run and no checkpoint would be guarded; write class {cls.__name__}(CheckpointGuardMixin, "
                "Trainer) instead"
            )

    def _coordinator(self) -> Coordinator:
        if self._ckptguard_coord is None:  # created on first use, by every rank alike
            self._ckptguard_coord = Coordinator(self.ckptguard_timeout_s)
        return self._ckptguard_coord

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """HF's train, resuming only from a verified checkpoint (True: the newest one; a path: that one, checked).

        Before step 1, as CheckpointManager does: the output directory is locked for this run (a second job
        on it gets LockedError) and probed with a real write on every process, and what a killed save left
        is removed under the lock. The lock is released when training ends.
        """
        if self.args.save_on_each_node:  # type: ignore[attr-defined]
            raise UnsupportedStateError(
                "save_on_each_node=True is not supported: one process commits each checkpoint",
                path=self.args.output_dir,  # type: ignore[attr-defined]
                remedy="Set save_on_each_node=False and put output_dir on storage every node can reach.",
            )
        out, coord = Path(self.args.output_dir), self._coordinator()  # type: ignore[attr-defined]
        staged.open_run(coord, out)
        given = self._ckptguard_args = self.args  # type: ignore[has-type]
        self.args = copy.copy(given)  # the caller's arguments stay as they were
        self.args.save_total_limit = None
        try:
            resume_from_checkpoint = coord.on_primary(lambda: _resume_path(out, resume_from_checkpoint))
            return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        finally:
            self.args, self._ckptguard_args = given, None
            staged.close_run(coord, out)

    def _get_output_dir(self, trial: Any) -> str:
        if self._ckptguard_staging is not None:
            return str(self._ckptguard_staging)
        return super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(self._get_output_dir(trial))
        step = self.state.global_step  # type: ignore[attr-defined]
        coord = self._coordinator()
        save = staged.begin(coord, run_dir, step)
        staging = save.path
        written, target = staging / checkpoint_name(step), run_dir / checkpoint_name(step)
        error: CheckpointError | None = None
        self._ckptguard_staging = staging
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
            self._record_best(run_dir, staging, written)  # every rank: each may load the best model at the end
        except Exception as exc:  # any failure on any rank must reach every rank as one typed error
            error = staged.write_error(exc, written, step)
        finally:
            self._ckptguard_staging = None
        staged.finish(
            save, error, written=written, metrics=self._eval_metrics(step),
            before_publish=lambda: _drop_jit_sentinel(target),
        )  # fmt: skip
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        limit = (self._ckptguard_args or self.args).save_total_limit  # type: ignore[attr-defined]
        protected = frozenset({Path(best).name} if best else set())
        coord.on_primary(lambda: staged.rotate(run_dir, limit, protected, protected_count=True), step=step)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        """HF's save of the model and ``training_args.bin``, shown the caller's arguments: the file records
        what the caller gave (not the copy without save_total_limit HF is shown while training), written once."""
        if self._ckptguard_args is None:
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        shown, self.args = self.args, self._ckptguard_args
        try:
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        finally:
            self.args = shown

    def _record_best(self, run_dir: Path, staging: Path, written: Path) -> None:
        """Point ``best_model_checkpoint`` at the final path (HF computed it inside staging); the process that
        saves the trainer state saves it again with that path."""
        best_step = self.state.best_global_step  # type: ignore[attr-defined]
        if not best_step:
            return
        final = run_dir / checkpoint_name(best_step)
        recorded = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        if (recorded and Path(recorded).parent == staging) or final.is_dir():
            self.state.best_model_checkpoint = str(final)  # type: ignore[attr-defined]
        if self.args.should_save:  # type: ignore[attr-defined]
            self.state.save_to_json(str(written / TRAINER_STATE_NAME))  # type: ignore[attr-defined]

    def _eval_metrics(self, step: int) -> dict[str, float]:
        """The eval metrics logged at this step, recorded in the manifest (``ckptguard ls`` shows them)."""
        metrics: dict[str, float] = {}
        for entry in self.state.log_history:  # type: ignore[attr-defined]
            if entry.get("step") == step:
                metrics.update({k: float(v) for k, v in entry.items() if k.startswith("eval_") and _finite_number(v)})
        return metrics


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _resume_path(output_dir: Path, requested: str | bool | None) -> str | None:
    """Which checkpoint HF may load: the newest verified one for True, the named one only if it verifies."""
    if requested is None or requested is False:
        return None
    if requested is True:
        found = newest_verified_checkpoint(output_dir)
        if found is None:
            raise CheckpointNotFoundError("no verified checkpoint to resume from", path=output_dir)
        return found
    return str(staged.require_verified(requested))


def _drop_jit_sentinel(target: Path) -> None:
    """Remove the directory HF's JIT save pre-creates at the final name, holding only its sentinel file."""
    if target.is_dir() and [p.name for p in target.iterdir()] == [JIT_SENTINEL]:
        remove(target)
