"""Tiny real training setups for the integration tests: a small Llama built locally, a fixed dataset.

Also the savers the crash harness forks (``faultkit.CrashHarness(saver="integrationkit:hf_saver")``):
each resumes through the library's own resume path, trains, and reports ``start N`` (the step it
resumed at) and ``saved N`` (a save that returned) on stdout, so the parent knows what was committed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

VOCAB = 64
SEQ = 16


def tiny_llama(seed: int = 0) -> Any:
    """A 2-layer Llama, random init; nothing is downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQ,
    )  # fmt: skip
    return LlamaForCausalLM(config)


class TokenData(torch.utils.data.Dataset):
    """Fixed random token rows; labels are the inputs (the model shifts them)."""

    def __init__(self, rows: int = 64, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def hf_args(output_dir: Path, **overrides: Any) -> Any:
    """TrainingArguments for a CPU run that saves every step, quietly."""
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir), "max_steps": 4, "save_steps": 1, "per_device_train_batch_size": 4,
        "learning_rate": 1e-3, "report_to": [], "use_cpu": True, "logging_steps": 1, "disable_tqdm": True,
        "save_total_limit": 3, "dataloader_num_workers": 0, "seed": 0,
    }  # fmt: skip
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def guarded_trainer_class() -> type:
    from transformers import Trainer

    from ckptguard.integrations.hf import CheckpointGuardMixin

    class GuardedTrainer(CheckpointGuardMixin, Trainer):
        pass

    return GuardedTrainer


def hf_trainer(
    output_dir: Path, *, guarded: bool = True, callbacks: list | None = None, evaluate: bool = False, **overrides: Any
) -> Any:
    """A Trainer (with ckptguard, or plain HF) on the tiny model and data (`evaluate`: with an eval set)."""
    from transformers import Trainer

    cls = guarded_trainer_class() if guarded else Trainer
    return cls(
        model=tiny_llama(), args=hf_args(output_dir, **overrides), train_dataset=TokenData(), callbacks=callbacks,
        eval_dataset=TokenData(rows=8, seed=3) if evaluate else None,
    )  # fmt: skip


def report_steps() -> Any:
    """A callback printing ``start N`` once resumed and ``saved N`` after each save returned."""
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            os.write(1, f"start {state.global_step}\n".encode())

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            os.write(1, f"saved {state.global_step}\n".encode())

    return Report()


def quiet_child() -> None:
    """One thread, and HF's printed logs sent to stderr: stdout carries only the harness's lines."""
    import sys

    torch.set_num_threads(1)
    sys.stdout = sys.stderr


def hf_saver(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """Crash-harness child: resume with ``resume_from_checkpoint=True`` when a verified checkpoint exists."""
    from ckptguard.integrations.hf import newest_verified_checkpoint

    quiet_child()
    resume = True if Path(run_dir).is_dir() and newest_verified_checkpoint(run_dir) else None
    trainer = hf_trainer(Path(run_dir), callbacks=[report_steps()], max_steps=10_000, save_total_limit=keep_last)
    trainer.train(resume_from_checkpoint=resume)


def preload() -> None:
    """What a crash-harness zygote imports once, so each forked trial starts in well under a second."""
    import accelerate  # noqa: F401
    import lightning.pytorch  # noqa: F401
    import transformers.trainer  # noqa: F401

    import ckptguard.integrations.accelerate
    import ckptguard.integrations.hf
    import ckptguard.integrations.lightning  # noqa: F401


TORN_STEP = 3  # the save during which the torn savers below kill themselves


def _killed_after_model_save(base: type) -> type:
    """`base` with a real SIGKILL of this process in the save of TORN_STEP, after the model file is written."""
    import signal

    class Torn(base):  # type: ignore[misc, valid-type]
        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            if self.state.global_step == TORN_STEP:
                os.kill(os.getpid(), signal.SIGKILL)
            super()._save_optimizer_and_scheduler(output_dir)

    return Torn


def _torn_run(run_dir: str, guarded: bool) -> None:
    from transformers import Trainer

    quiet_child()
    cls = _killed_after_model_save(guarded_trainer_class() if guarded else Trainer)
    args = hf_args(Path(run_dir), max_steps=10)
    cls(model=tiny_llama(), args=args, train_dataset=TokenData(), callbacks=[report_steps()]).train()


def hf_plain_torn(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """Crash-harness child: plain HF Trainer, killed in the middle of its save of TORN_STEP."""
    _torn_run(run_dir, guarded=False)


def hf_guarded_torn(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """The same run and the same kill, with ckptguard."""
    _torn_run(run_dir, guarded=True)


def hf_jit_saver(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """Crash-harness child: no periodic saves; a SIGTERM to itself after step 2, so HF's JIT checkpoint
    (enabled by ``enable_jit_checkpoint``) saves once its grace period ends, and training stops."""
    import signal

    from transformers import TrainerCallback

    class Preempt(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    quiet_child()
    trainer = hf_trainer(
        Path(run_dir), callbacks=[report_steps(), Preempt()], max_steps=10_000, save_steps=100_000,
        enable_jit_checkpoint=True,
    )  # fmt: skip
    trainer.train()


def resumed_step(trainer: Any, resume: Any) -> int:
    """Run `trainer.train(resume_from_checkpoint=resume)`; the step it resumed at.

    The weights it resumed with are left in `trainer.resumed_weights`.
    """
    from transformers import TrainerCallback

    seen: list[int] = []

    class Begin(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            seen.append(state.global_step)
            trainer.resumed_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    trainer.add_callback(Begin())
    trainer.train(resume_from_checkpoint=resume)
    return seen[0]


def accelerate_run(
    run_dir: Path,
    *,
    guarded: bool,
    max_steps: int,
    torn: bool = False,
    keep_last: int = 2,
    after_save: Callable[[int], None] | None = None,
) -> Any:
    """Train the tiny model with Accelerate, resuming first and saving every step; reports on fd 1.

    Both use Accelerate's automatic naming (``checkpoint_<i>``, total_limit=keep_last): `guarded`, through
    ckptguard's save_state/load_state into `run_dir` (``run_dir/checkpoint_<step - 1>``, the step in its
    manifest); otherwise Accelerate's own (``run_dir/checkpoints/checkpoint_<i>``). `torn`: SIGKILL this process
    in the save of TORN_STEP, after the checkpoint directory exists and before anything is written.
    `after_save(step)` runs on the main process after each save. Returns the Accelerator.
    """
    import signal

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from ckptguard.integrations import accelerate as guard

    config = ProjectConfiguration(project_dir=str(run_dir), automatic_checkpoint_naming=True, total_limit=keep_last)
    acc = Accelerator(cpu=True, project_config=config)
    torch.manual_seed(0)
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.utils.data.DataLoader(TokenData(), batch_size=4)
    model, opt, data = acc.prepare(model, opt, data)
    if torn:
        acc.register_save_state_pre_hook(
            lambda *_: os.kill(os.getpid(), signal.SIGKILL) if acc.save_iteration == TORN_STEP - 1 else None
        )
    if guarded:
        guard.load_state(acc, run_dir, missing_ok=True)
    elif (run_dir / "checkpoints").is_dir():
        acc.load_state()
    start = acc.save_iteration  # saves made so far: the step resumed at
    os.write(1, f"start {start}\n".encode())
    batches = iter(data)
    for step in range(start + 1, max_steps + 1):
        batch = next(batches, None) or next(batches := iter(data))
        acc.backward(model(**batch).loss)
        opt.step()
        opt.zero_grad()
        if guarded:
            guard.save_state(acc, run_dir, step)  # total_limit: keep_last
        else:
            acc.save_state()
        os.write(1, f"saved {step}\n".encode())
        if after_save is not None and acc.is_main_process:
            after_save(step)
    return acc


def accelerate_plain_torn(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """Crash-harness child: Accelerate's own save_state, killed in its save of TORN_STEP."""
    quiet_child()
    accelerate_run(Path(run_dir), guarded=False, max_steps=10, torn=True)


def accelerate_guarded_torn(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """The same run and the same kill, through ckptguard's save_state."""
    quiet_child()
    accelerate_run(Path(run_dir), guarded=True, max_steps=10, torn=True)


def accelerate_saver(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """Crash-harness child: resume with ckptguard's load_state, then save every step until killed."""
    quiet_child()
    accelerate_run(Path(run_dir), guarded=True, max_steps=10_000, keep_last=keep_last)


def lightning_run(
    run_dir: Path,
    *,
    guarded: bool,
    max_steps: int,
    after_save: Callable[[int], None] | None = None,
    resume: str = "verified",
    ballast: int = 0,
    callbacks: tuple[Any, ...] = (),
    **trainer_args: Any,
) -> Any:
    """Fit the tiny model with Lightning, saving every step (top 2 by step, and last.ckpt); reports on fd 1.

    `guarded`: with VerifiedCheckpointIO, resuming from newest_verified_ckpt (`resume="last"`: from
    ``ckpt_path="last"``); otherwise plain Lightning, resuming from ``ckpt_path="last"``. `trainer_args`
    replace the Trainer's (strategy, devices, plugins); `callbacks` are added to its own. `ballast`: a buffer
    of that many float32 zeros in the module, for checkpoints that take a while to write. Returns the
    Trainer, with the step it resumed at in ``started_at``."""
    import lightning.pytorch as pl

    from ckptguard.integrations.lightning import VerifiedCheckpointIO, newest_verified_ckpt

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama()
            self.register_buffer("ballast", torch.zeros(ballast))

        def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Report(pl.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            trainer.started_at = trainer.global_step
            os.write(1, f"start {trainer.global_step}\n".encode())

    class Reporting(VerifiedCheckpointIO if guarded else pl.plugins.TorchCheckpointIO):  # type: ignore[misc]
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            super().save_checkpoint(checkpoint, path, storage_options)
            if Path(path).name == "last.ckpt":  # saved after the top-k one of the same step
                os.write(1, f"saved {checkpoint['global_step']}\n".encode())
                if after_save is not None:
                    after_save(checkpoint["global_step"])

    every_step = pl.callbacks.ModelCheckpoint(
        dirpath=run_dir, every_n_train_steps=1, save_top_k=2, monitor="step", mode="max", save_last=True
    )
    args: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "callbacks": [every_step, Report(), *callbacks],
        "plugins": [Reporting()], "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }  # fmt: skip
    trainer = pl.Trainer(**(args | trainer_args))
    torch.manual_seed(0)
    module = Module()
    data = torch.utils.data.DataLoader(TokenData(), batch_size=4)
    verified = guarded and resume == "verified"
    trainer.fit(
        module, data, ckpt_path=(newest_verified_ckpt(run_dir) if verified else "last") if run_dir.is_dir() else None
    )
    return trainer


def lightning_saver(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """Crash-harness child: resume from ckpt_path="last" with VerifiedCheckpointIO, save every step until killed."""
    quiet_child()
    lightning_run(Path(run_dir), guarded=True, max_steps=10_000)


def require(library: str) -> None:
    """Skip unless `library` is installed in the range its integration is tested with (pyproject's extras).

    The Higgs environment runs transformers 4.46, whose private Trainer methods have other signatures
    than those the HF integration overrides: there its tests skip with that reason.
    """
    import pytest

    module = pytest.importorskip({"hf": "transformers", "accelerate": "accelerate", "lightning": "lightning"}[library])
    if library == "hf":
        major, minor = (int(x) for x in module.__version__.split(".")[:2])
        if not (5, 23) <= (major, minor) < (5, 26):
            reason = f"the HF integration is tested with transformers 5.23-5.25, this is {module.__version__}"
            pytest.skip(reason, allow_module_level=True)
