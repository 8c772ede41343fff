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


def _report_steps() -> Any:
    """A callback printing ``start N`` once resumed and ``saved N`` after each save returned."""
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            os.write(1, f"start {state.global_step}\n".encode())

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            os.write(1, f"saved {state.global_step}\n".encode())

    return Report()


def _quiet_child() -> None:
    """One thread, and HF's printed logs sent to stderr: stdout carries only the harness's lines."""
    import sys

    torch.set_num_threads(1)
    sys.stdout = sys.stderr


def hf_saver(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """Crash-harness child: resume with ``resume_from_checkpoint=True`` when a verified checkpoint exists."""
    from ckptguard.integrations.hf import newest_verified_checkpoint

    _quiet_child()
    resume = True if Path(run_dir).is_dir() and newest_verified_checkpoint(run_dir) else None
    trainer = hf_trainer(Path(run_dir), callbacks=[_report_steps()], max_steps=10_000, save_total_limit=keep_last)
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

    _quiet_child()
    cls = _killed_after_model_save(guarded_trainer_class() if guarded else Trainer)
    args = hf_args(Path(run_dir), max_steps=10)
    cls(model=tiny_llama(), args=args, train_dataset=TokenData(), callbacks=[_report_steps()]).train()


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

    _quiet_child()
    trainer = hf_trainer(
        Path(run_dir), callbacks=[_report_steps(), Preempt()], max_steps=10_000, save_steps=100_000,
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

    `guarded`: ckptguard's save_state/load_state into `run_dir`; otherwise Accelerate's own automatic
    naming (`run_dir/checkpoints/checkpoint_<i>`, total_limit=keep_last). `torn`: SIGKILL this process
    in the save of TORN_STEP, after the checkpoint directory exists and before anything is written.
    `after_save(step)` runs on the main process after each save. Returns the Accelerator.
    """
    import signal

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from ckptguard.integrations import accelerate as guard

    config = ProjectConfiguration(
        project_dir=str(run_dir), automatic_checkpoint_naming=not guarded, total_limit=None if guarded else keep_last
    )
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
        guard.load_state(acc, run_dir)
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
            guard.save_state(acc, run_dir, step, keep_last=keep_last)
        else:
            acc.save_state()
        os.write(1, f"saved {step}\n".encode())
        if after_save is not None and acc.is_main_process:
            after_save(step)
    return acc


def accelerate_plain_torn(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """Crash-harness child: Accelerate's own save_state, killed in its save of TORN_STEP."""
    _quiet_child()
    accelerate_run(Path(run_dir), guarded=False, max_steps=10, torn=True)


def accelerate_guarded_torn(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """The same run and the same kill, through ckptguard's save_state."""
    _quiet_child()
    accelerate_run(Path(run_dir), guarded=True, max_steps=10, torn=True)


def accelerate_saver(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """Crash-harness child: resume with ckptguard's load_state, then save every step until killed."""
    _quiet_child()
    accelerate_run(Path(run_dir), guarded=True, max_steps=10_000, keep_last=keep_last)


def _rank(library: str, out: Path, mode: str, disk: str) -> None:
    """One rank of a two-process run (see :func:`ranks`); prints one JSON line with its outcome."""
    import json
    import sys

    from ckptguard.errors import CheckpointError

    _quiet_child()
    fill = None
    if mode == "enospc" and os.environ["RANK"] == "0":
        from faultkit import Filler

        filler = Filler(Path(disk))

        def fill(step: int) -> None:
            if step == 2:
                filler.leave_bytes(64 << 10)

    max_steps = {"enospc": 4, "train": 10_000, "resume": 0}[mode]
    try:
        if library == "hf":
            step = _hf_rank_run(out, mode, max_steps, fill)
        else:
            step = accelerate_run(out, guarded=True, max_steps=max_steps, after_save=fill).save_iteration
    except CheckpointError as exc:
        os.write(1, (json.dumps({"type": type(exc).__name__, "errno": exc.errno, "step": exc.step}) + "\n").encode())
        sys.exit(3)
    os.write(1, (json.dumps({"resumed": step}) + "\n").encode())


def _hf_rank_run(out: Path, mode: str, max_steps: int, fill: Callable[[int], None] | None) -> int:
    from transformers import TrainerCallback

    class AfterSave(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if fill is not None:
                fill(state.global_step)

    trainer = hf_trainer(out, callbacks=[_report_steps(), AfterSave()], max_steps=max_steps or 1)
    return resumed_step(trainer, True if mode == "resume" else None)


def ranks(library: str, out: Path, mode: str, disk: Path | None = None) -> list[Any]:
    """Start a two-rank (gloo) run of `library` ("hf" or "accelerate") on `out`: "train" saves every step
    until killed, "enospc" fills `disk` after step 2, "resume" only resumes. Returns the rank processes."""
    import sys

    from faultkit import launch_ranks

    cmd = [sys.executable, __file__, "rank", library, str(out), mode, str(disk or "")]
    return launch_ranks([cmd, cmd])


def lightning_run(
    run_dir: Path, *, guarded: bool, max_steps: int, after_save: Callable[[int], None] | None = None
) -> Any:
    """Fit the tiny model with Lightning, saving every step (top 2 by step, and last.ckpt); reports on fd 1.

    `guarded`: with VerifiedCheckpointIO, resuming from newest_verified_ckpt; otherwise plain Lightning,
    resuming from ``ckpt_path="last"``. Returns the Trainer."""
    import lightning.pytorch as pl

    from ckptguard.integrations.lightning import VerifiedCheckpointIO, newest_verified_ckpt

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama()

        def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Report(pl.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
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
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, callbacks=[every_step, Report()], plugins=[Reporting()],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    torch.manual_seed(0)
    module = Module()
    data = torch.utils.data.DataLoader(TokenData(), batch_size=4)
    resume = (newest_verified_ckpt(run_dir) if guarded else "last") if run_dir.is_dir() else None
    trainer.fit(module, data, ckpt_path=resume)
    return trainer


def lightning_saver(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """Crash-harness child: resume from ckpt_path="last" with VerifiedCheckpointIO, save every step until killed."""
    _quiet_child()
    lightning_run(Path(run_dir), guarded=True, max_steps=10_000)


def rank_outcomes(procs: list[Any], timeout: float = 240) -> list[dict[str, Any]]:
    """Each rank's last stdout line as JSON, once both ended (killed at the timeout)."""
    import json

    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert out.strip(), f"rank printed nothing (exit {p.returncode}):\n{err[-3000:]}"
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
    return results


def kill_two_ranks_then_resume(library: str, out: Path, trials: int) -> list[tuple[int, list[int]]]:
    """`trials` times: two ranks save every step, both get a SIGKILL at a random instant after a save
    returned; then two fresh ranks resume. Returns (newest verified step, steps the ranks resumed at)."""
    import random
    import time

    from faultkit import committed_steps

    outcomes = []
    for trial in range(trials):
        procs = ranks(library, out, "train")
        try:
            for line in procs[0].stdout:  # wait until a save returned, then kill at a random instant
                if line.startswith("saved ") and int(line.split()[1]) >= 2 * (trial + 1):
                    break
            time.sleep(random.Random(trial).uniform(0.0, 0.8))
        finally:
            for p in procs:
                p.kill()
                p.wait()
        newest = max(committed_steps(out))
        outcomes.append((newest, [r["resumed"] for r in rank_outcomes(ranks(library, out, "resume"))]))
    return outcomes


def random_kill_trials(harness: Any, run_dir: Path, saver: str, trials: int, delays: tuple[float, float]) -> int:
    """`trials` savers on `run_dir`, each SIGKILLed after a random delay in `delays`; each one resumes where the
    previous died, and must resume exactly at the newest checkpoint that verifies. Returns how many were
    killed (rather than ending by themselves)."""
    import random

    from ckptguard import verify_checkpoint
    from faultkit import committed_steps

    rng = random.Random(trials)
    floor = killed = 0
    for _ in range(trials):
        newest = max(committed_steps(run_dir), default=0)
        assert newest in (floor, floor + 1), f"checkpoint-{newest} is the newest valid one, {floor} was committed"
        trial = harness.trial(run_dir, rng.uniform(*delays), saver=saver, keep_last=2)
        assert trial.error is None, trial.error
        assert trial.start == newest, f"resumed at {trial.start}, checkpoint-{newest} is the newest verified"
        floor = trial.saved[-1] if trial.saved else newest
        killed += trial.killed
    damaged = [p for p in run_dir.iterdir() if p.name.startswith("checkpoint-") and not verify_checkpoint(p).ok]
    assert not damaged, f"damaged checkpoints under a checkpoint name: {damaged}"
    return killed


def full_disk_on_two_ranks(library: str, disk: Path) -> None:
    """Two ranks of `library` on a tmpfs that fills up after step 2: the save of step 3 fails on both ranks
    with the same WriteError (ENOSPC), and steps 1 and 2 stay committed, with no staging left."""
    import errno

    from faultkit import committed_steps

    out = disk / "run"
    outcomes = rank_outcomes(ranks(library, out, "enospc", disk))
    assert outcomes == [{"type": "WriteError", "errno": errno.ENOSPC, "step": 3}] * 2
    assert committed_steps(out) == [1, 2]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".staging")]


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["rank"] and len(sys.argv) == 6:
        _rank(sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        sys.exit("usage: integrationkit.py rank hf|accelerate OUT train|enospc|resume DISK")
