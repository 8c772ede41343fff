"""Exact resume: a training run SIGKILLed at a random step and resumed ends bit-identical to one never killed.

The kill is real: a child process running ``python -m ckptguard.train`` gets SIGKILL from this test
at a step chosen at random (the seed is in the failure message), possibly in the middle of a save.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptguard.cli.main import main
from trainkit import signal_at

MAX_STEPS = 40


def tiny(out: Path, *extra: str) -> list[str]:
    """``--set`` arguments of a run small enough to take seconds: tiny model, short sequences."""
    values = [
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "data.seq_len=32",
        "train.batch_size=4",
        f"train.max_steps={MAX_STEPS}",
        "train.log_every=1",
        "train.eval_every=10",
        "train.eval_batches=2",
        "train.progress_bar=false",
        "checkpoint.save_every=5",
        "checkpoint.keep_last=2",
        "lora.dropout=0.1",  # dropout draws from the RNG every step: resume must restore it exactly
        f"checkpoint.output_dir={out}",
        *extra,
    ]
    return [arg for v in values for arg in ("--set", v)]


def adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "adapter_model.safetensors")


def run_until_killed(out: Path, kill_at: int) -> int:
    """Start training in a child, SIGKILL it once it reports step `kill_at`; returns the last step seen."""
    # the same thread count as this process, which trains the reference and the resumed half
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "ckptguard.train", *tiny(out)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen, deadline = 0, time.monotonic() + 120
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("step ") and "/" in line.split()[1]:
                seen = int(line.split()[1].split("/")[0])
            if seen >= kill_at or time.monotonic() > deadline:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, f"child ended by itself (rc={child.returncode}) before the kill"
    return seen


@pytest.mark.slow
def test_sigkill_at_random_step_then_resume_ends_bit_identical(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    kill_at = random.Random(seed).randint(6, MAX_STEPS - 8)
    why = f"(random seed {seed}, killed at step {kill_at})"

    assert main(["train", *tiny(tmp_path / "straight")]) == 0
    reference = adapter(tmp_path / "straight" / f"checkpoint-{MAX_STEPS}")

    seen = run_until_killed(tmp_path / "killed", kill_at)
    assert seen < MAX_STEPS, why
    assert main(["train", *tiny(tmp_path / "killed")]) == 0, why
    resumed = adapter(tmp_path / "killed" / f"checkpoint-{MAX_STEPS}")

    assert reference.keys() == resumed.keys(), why
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs after resume {why}"


def test_resume_refuses_another_lora_shape_with_a_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *tiny(out, "train.max_steps=5")]) == 0
    capsys.readouterr()

    assert main(["train", *tiny(out, "train.max_steps=10", "lora.r=4")]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume from {out / 'checkpoint-5'}" in err
    assert "lora.r: checkpoint has 8, this run has 4" in err
    assert not (out / "checkpoint-10").exists()


def test_resume_refuses_other_training_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *tiny(out, "train.max_steps=5")]) == 0
    capsys.readouterr()

    assert main(["train", *tiny(out, "train.max_steps=10", "data.seq_len=48")]) == 2
    assert "training data: checkpoint has blocks" in capsys.readouterr().err


def test_resume_from_explicit_path_and_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *tiny(out, "train.max_steps=10")]) == 0
    capsys.readouterr()

    # An explicit checkpoint, with a longer schedule: training continues from step 5, not 10.
    assert main(["train", *tiny(out, "train.max_steps=12"), "--resume", str(out / "checkpoint-5")]) == 0
    text = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoint-5'} at step 5" in text
    assert "step 6/12" in text

    # none over these checkpoints: refused, naming what is there, unless --new-timeline says so.
    assert main(["train", *tiny(out, "train.max_steps=2"), "--resume", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume none: checkpoint.output_dir {out} already holds 3 valid checkpoint(s)")
    assert "checkpoint-10 (step 10), checkpoint-12 (step 12)" in err and "pass --new-timeline" in err
    assert main(["train", *tiny(out, "train.max_steps=2"), "--resume", "none", "--new-timeline"]) == 0
    captured = capsys.readouterr()
    assert "resumed from" not in captured.out and "step 1/2" in captured.out
    assert "--new-timeline: starting a new run at step 0 among them" in captured.err


@pytest.mark.parametrize("where", ["nowhere", "run", "run/checkpoint-5"])
def test_resume_from_a_path_that_is_no_checkpoint_is_refused_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)  # a directory of that name, never a checkpoint
    assert main(["train", *tiny(tmp_path / "out"), "--resume", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    found = {
        "nowhere": "there is nothing at that path",
        "run": "it is not a checkpoint directory (no MANIFEST.json); it holds checkpoints, so it looks like a run "
        f"directory: pass one of them, or --resume auto with checkpoint.output_dir={tmp_path / 'run'}",
        "run/checkpoint-5": "it is not a checkpoint directory (no MANIFEST.json)",
    }[where]
    assert (
        err == f"error: --resume {tmp_path / where}: {found}. `ckptguard ls RUN_DIR` lists the checkpoints of a run\n"
    )


def test_sigterm_saves_at_the_next_step_and_exits_75_then_resume_finishes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    returncode, text = signal_at(tiny(out, "checkpoint.save_every=100"), "step 3/", signal.SIGTERM)
    assert returncode == 75, text
    stopped = int(text.split("stopped by SIGTERM: step ")[1].split("/")[0])
    assert (out / f"checkpoint-{stopped}").is_dir() and stopped < MAX_STEPS

    assert main(["train", *tiny(out, "checkpoint.save_every=100")]) == 0
    assert f"resumed from {out / f'checkpoint-{stopped}'} at step {stopped}" in capsys.readouterr().out


def test_a_damaged_named_checkpoint_is_refused_with_its_reason_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(["train", *tiny(out, "train.max_steps=2")]) == 0
    adapter_file = out / "checkpoint-2" / "adapter_model.safetensors"
    adapter_file.write_bytes(adapter_file.read_bytes()[:-10])  # truncated
    capsys.readouterr()

    assert main(["train", *tiny(out, "train.max_steps=4"), "--resume", str(out / "checkpoint-2")]) == 1
    assert capsys.readouterr().err.startswith("error: CorruptCheckpointError: checkpoint is not valid: ")
    logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert logged and all(r.exc_info is None for r in logged)  # the typed message, not a traceback
