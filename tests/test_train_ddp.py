"""The trainer under DDP with gloo on CPU: gradients averaged through the DDP wrapper, and a fault on
one rank (or under all of them) stops every rank with the same error: each rank exits by itself (a rank
left waiting would be killed at the hang bound and fail the exit-code checks).

Faults are real: rank 1 in its own mount namespace where the run directory is bind-mounted
read-only, as on a node whose mount went read-only; and a tmpfs that fills up between two saves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptguard import verify_checkpoint
from ckptguard.cli.main import main
from faultkit import Filler, launch_ranks, tmpfs
from test_train_guards import poisoned_setup

STEPS = 6


def tiny(out: Path | str, batch_size: int, *extra: str) -> list[str]:
    values = [
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "data.seq_len=32",
        f"train.batch_size={batch_size}",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "train.eval_batches=1",
        "train.progress_bar=false",
        f"checkpoint.save_every={STEPS}",
        f"checkpoint.output_dir={out}",
        *extra,
    ]
    return [arg for v in values for arg in ("--set", v)]


def losses(stdout: str) -> list[float]:
    words = [line.split() for line in stdout.splitlines()]
    return [float(w[3]) for w in words if len(w) > 3 and w[0] == "step" and w[2] == "loss"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_two_ranks_of_batch_b_match_one_rank_of_batch_2b(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "ckptguard.train", *tiny(tmp_path / "ddp", 2),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env())
    assert done.returncode == 0, done.stdout + done.stderr

    assert main(["train", *tiny(tmp_path / "single", 4)]) == 0
    single_losses = losses(capsys.readouterr().out)

    assert len(losses(done.stdout)) == STEPS
    assert losses(done.stdout) == pytest.approx(single_losses, abs=2e-4)  # printed with 4 decimals
    ddp = load_file(tmp_path / "ddp" / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    single = load_file(tmp_path / "single" / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    assert ddp.keys() == single.keys()
    moved = [k for k in single if "lora_B" in k and single[k].abs().max() > 0]
    assert moved, "the adapter never trained"
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    # every rank saved its own RNG streams
    ranks = sorted(p.name for p in (tmp_path / "ddp" / f"checkpoint-{STEPS}" / "state").glob("rank*"))
    assert ranks == ["rank0", "rank1"]


def test_gradient_accumulation_of_b_matches_one_batch_of_2b(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *tiny(tmp_path / "accum", 2, "train.grad_accum=2")]) == 0
    accum_losses = losses(capsys.readouterr().out)
    assert main(["train", *tiny(tmp_path / "single", 4)]) == 0
    assert accum_losses == pytest.approx(losses(capsys.readouterr().out), abs=2e-4)  # printed with 4 decimals
    accum = load_file(tmp_path / "accum" / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    single = load_file(tmp_path / "single" / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    for name in single:
        torch.testing.assert_close(accum[name], single[name], rtol=1e-4, atol=1e-5, msg=name)


def _require_mount_namespaces() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a read-only bind mount for one rank needs root and unshare (util-linux)")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace: {probe.stderr.strip()}")


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[str, str]]:
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            p.kill()
    return outputs


def _error_lines(outputs: list[tuple[str, str]]) -> list[str]:
    return [next(line for line in err.splitlines() if line.startswith("error: ")) for _, err in outputs]


@pytest.mark.slow
def test_a_read_only_mount_on_one_rank_stops_every_rank_before_step_1(tmp_path: Path) -> None:
    _require_mount_namespaces()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = ["-m", "ckptguard.train", *tiny(run_dir, 2, "checkpoint.timeout_s=60")]
    # rank 1 sees the run directory through a read-only bind mount in its private mount namespace
    read_only = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    rank1 = ["unshare", "--mount", "--propagation", "private", "sh", "-c", read_only, "sh", str(run_dir)]
    procs = launch_ranks([[sys.executable, *args], [*rank1, sys.executable, *args]])
    outputs = _finish(procs)
    assert [p.returncode for p in procs] == [1, 1], outputs
    errors = _error_lines(outputs)
    assert errors[0] == errors[1], "ranks disagree on the failure"
    assert errors[0].startswith("error: NotWritableError: cannot write files in the run directory: Read-only")
    assert f"path={run_dir}," in errors[0] and "errno=EROFS" in errors[0] and "rank=1" in errors[0]
    assert "step 1/" not in outputs[0][0], "the preflight must stop the run before any training step"
    assert not list(run_dir.glob("checkpoint-*")) and not list(run_dir.glob(".staging-*"))


@pytest.mark.slow
def test_disk_filling_up_between_saves_fails_the_next_save_on_every_rank(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="16m") as disk:
        run_dir = disk / "run"
        args = ["-m", "ckptguard.train", *tiny(run_dir, 2, "train.max_steps=60", "checkpoint.save_every=3",
                                                "checkpoint.timeout_s=60")]  # fmt: skip
        procs = launch_ranks([[sys.executable, *args], [sys.executable, *args]])
        for line in procs[0].stdout:  # let the run save once, then fill the disk under it
            if line.startswith("saved checkpoint-3"):
                Filler(disk).leave_bytes(0)
                break
        outputs = _finish(procs)
        assert [p.returncode for p in procs] == [1, 1], outputs
        errors = _error_lines(outputs)
        assert errors[0] == errors[1], "ranks disagree on the failure"
        assert "errno=ENOSPC" in errors[0] and ("WriteError" in errors[0] or "InsufficientSpaceError" in errors[0])
        assert not list(run_dir.glob(".staging-*"))
        assert (run_dir / "LATEST").read_text().strip() == "checkpoint-3"
        assert verify_checkpoint(run_dir / "checkpoint-3").ok


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_error(tmp_path: Path) -> None:
    # One record per rank and step: the step that meets a poisoned record meets it on one rank only.
    values = (*poisoned_setup(tmp_path, clean=6), "train.max_steps=4", "checkpoint.save_every=100",
              "checkpoint.timeout_s=60")  # fmt: skip
    args = [sys.executable, "-m", "ckptguard.train", *tiny(tmp_path / "run", 1, *values)]
    procs = launch_ranks([args, args])
    outputs = _finish(procs)
    assert [p.returncode for p in procs] == [2, 2], outputs
    errors = _error_lines(outputs)
    assert errors[0] == errors[1], "ranks disagree on the failure"
    assert (
        errors[0].startswith("error: training diverged at step ") and "no checkpoint was saved before it" in errors[0]
    )
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_direct_to_remote_saving_with_two_ranks_is_a_config_error_on_both(tmp_path: Path) -> None:
    """Direct mode has no shared staging for several ranks' files: refused before any bucket is touched."""
    overrides = ("checkpoint.remote_mode=direct", "checkpoint.timeout_s=60")
    args = [sys.executable, "-m", "ckptguard.train", *tiny("s3://any-bucket/run", 1, *overrides)]
    outputs = _finish(launch_ranks([args, args]))
    errors = _error_lines(outputs)
    assert errors[0] == errors[1], outputs
    assert errors[0] == (
        "error: [checkpoint]: direct-to-remote saving runs in one process; use the tiered mode with several ranks"
    )
