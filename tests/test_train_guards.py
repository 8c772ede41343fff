"""guards.py: inputs that used to train silently wrong now stop the run, or say so, before harm is done.

A diverging run stops at the step whose loss or gradient norm is not finite, before its update, and
the checkpoints already written stay the newest valid ones; a LoRA target that matches nothing stops
the run before step 1; a run with eval turned off says so; a finished run is not run again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptguard import CheckpointManager
from ckptguard.cli.main import main
from conftest import save_tiny_hf_model
from test_train_resume import tiny

POISON = "~"  # the poisoned model's embedding of this character is inf


def valid_steps(run_dir: Path) -> list[int]:
    with CheckpointManager(run_dir) as mgr:
        return [c.step for c in mgr.list() if c.valid]


def assert_all_finite(checkpoint: Path) -> None:
    for name in ("adapter_model.safetensors", "state/optimizer.safetensors"):
        for key, tensor in load_file(checkpoint / name).items():
            assert torch.isfinite(tensor).all(), f"{checkpoint.name}/{name}: {key} is not finite"


def test_a_diverging_run_stops_before_the_update_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *tiny(out, "train.max_steps=4", "checkpoint.save_every=2")]) == 0
    latest_before = (out / "LATEST").read_text()
    capsys.readouterr()

    # The same run resumed with an absurd learning rate, no warmup and no clipping: it diverges.
    huge = ("optim.lr=1e30", "optim.warmup_steps=0", "optim.max_grad_norm=0", "train.eval_every=100")
    assert main(["train", *tiny(out, "train.max_steps=20", "checkpoint.save_every=100", *huge)]) == 2
    err = capsys.readouterr().err
    step = int(err.split("training diverged at step ")[1].split(":")[0])
    assert err.startswith(f"error: training diverged at step {step}: loss ")
    assert (
        "its update was not applied and nothing was saved; the newest valid checkpoint is "
        f"{out / 'checkpoint-4'} (step 4): it is untouched. Try: lower optim.lr (now 1e+30), "
        "raise optim.warmup_steps (now 0), clip gradients with optim.max_grad_norm (now 0: off), "
        'or set train.on_nonfinite = "skip" to skip such steps'
    ) in err
    assert valid_steps(out) == [2, 4] and (out / "LATEST").read_text() == latest_before

    # Saved (and evaluated) every step: the last finite step is the newest checkpoint, nothing after it.
    assert main(["train", *tiny(out, "train.max_steps=20", "checkpoint.save_every=1", *huge)]) == 2
    err = capsys.readouterr().err
    step = int(err.split("training diverged at step ")[1].split(":")[0])
    assert f"was saved; the newest valid checkpoint is {out / f'checkpoint-{step - 1}'} (step {step - 1})" in err
    assert max(valid_steps(out)) == step - 1 and not (out / f"checkpoint-{step}").exists()
    for s in valid_steps(out):
        assert_all_finite(out / f"checkpoint-{s}")


def poisoned_setup(tmp_path: Path, clean: int = 12) -> tuple[str, ...]:
    """Config values: a Hugging Face model that cannot take POISON, `clean` records and 2 holding POISON.

    Unpacked, each record is its own block; the eval file is clean.
    """
    model_dir, data, held_out = tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    save_tiny_hf_model(model_dir, poisoned=POISON)
    texts = [f"line {i}: all is well" for i in range(clean)] + [f"line {POISON} one", f"line two {POISON}"]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    held_out.write_text(json.dumps({"text": "a clean line to evaluate on"}) + "\n")
    return (
        "model.backend=hf-causal-lm", f"model.path={model_dir}", f"data.train={data}", f"data.eval={held_out}",
        "data.packing=false", "data.seq_len=24", 'lora.target_modules=["q_proj", "v_proj"]',
    )  # fmt: skip


def _poisoned_run(tmp_path: Path, *extra: str) -> list[str]:
    """One poisoned run on one process, one record per step for one epoch."""
    values = ("train.batch_size=1", "train.max_steps=14", "checkpoint.save_every=7", *extra)
    return tiny(tmp_path / "run", *poisoned_setup(tmp_path), *values)


def test_skip_mode_skips_exactly_the_non_finite_steps_and_trains_on_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *_poisoned_run(tmp_path, "train.on_nonfinite=skip")]) == 0
    text = capsys.readouterr().out
    skipped = [line for line in text.splitlines() if ": skipped (loss nan, gradient norm nan)" in line]
    assert len(skipped) == 2, text  # one epoch, one record per step: each poisoned record once
    assert "  skipped      2 step(s) with a non-finite loss or gradient norm" in text
    final = tmp_path / "run" / "checkpoint-14"
    assert_all_finite(final)
    assert any(t.abs().max() > 0 for k, t in load_file(final / "adapter_model.safetensors").items() if "lora_B" in k)


def test_stop_mode_names_the_step_of_the_first_poisoned_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *_poisoned_run(tmp_path)]) == 2
    err = capsys.readouterr().err
    step = int(err.split("training diverged at step ")[1].split(":")[0])
    assert f"training diverged at step {step}: loss nan, gradient norm nan; " in err
    assert all(s < step for s in valid_steps(tmp_path / "run"))


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ('["q_proj", "nonexistent_proj"]', "'nonexistent_proj' matches no module of the model; "),
        ('["q_proj", "self_attn.v_prj"]', "'self_attn.v_prj' matches no module of the model; did you mean "
         "'v_proj', 'q_proj', 'o_proj'? "),
    ],
)  # fmt: skip
def test_a_lora_target_that_matches_nothing_stops_before_step_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], targets: str, message: str
) -> None:
    assert main(["train", *tiny(tmp_path / "run", f"lora.target_modules={targets}")]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"error: lora.target_modules: {message}the model's linear and embedding layers are named "
        "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj\n"
    )
    assert "step 1" not in captured.out and not (tmp_path / "run").exists()


def test_eval_fraction_0_trains_on_every_record_and_turns_eval_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i} " * 20}) + "\n" for i in range(2)))
    out = tmp_path / "run"
    values = ("data.eval_fraction=0", f"data.train={data}", "train.max_steps=2", "checkpoint.save_every=2")
    assert main(["train", *tiny(out, *values)]) == 0
    text = capsys.readouterr().out
    assert "eval_loss" not in text
    assert "  eval loss    off (data.eval_fraction is 0 and data.eval is not set)" in text
    with CheckpointManager(out) as mgr:
        latest = mgr.latest()
    assert latest is not None and set(latest.metrics) == {"train_loss"}


def test_a_finished_run_says_so_instead_of_training_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *tiny(out, "train.max_steps=3")]) == 0
    capsys.readouterr()
    assert main(["train", *tiny(out, "train.max_steps=2")]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[-1] == (
        f"nothing to do: the run already finished at step 3 ({out / 'checkpoint-3'}); train.max_steps is 2. "
        "Raise train.max_steps to train further"
    )
    assert "nan" not in text and "step 3/2" not in text


def test_nan_and_inf_config_numbers_name_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    for override, got in [("optim.lr=nan", "nan"), ("optim.max_grad_norm=inf", "inf"), ("lora.dropout=-inf", "-inf")]:
        assert main(["train", "--set", override]) == 2
        field = override.split("=")[0]
        assert capsys.readouterr().err == f"error: {field}: expected a finite number, got {got}\n"
