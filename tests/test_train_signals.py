"""Ctrl-C and SIGTERM, from the first moments of start-up on: real signals to a real trainer process.

The first Ctrl-C is a stop request like SIGTERM (save at the next step boundary, exit 75); a second
one aborts at once (exit 130) without a traceback, and says whether steps are lost by what the disk holds;
a SIGTERM before step 1, even while torch imports, stops the run cleanly. tests/importhold holds a child
at one import, so a signal lands at a moment the test observed: torch's import, or the report's
(matplotlib), which the trainer writes after its summary, before its cleanup.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from ckptguard import CheckpointManager
from test_train_resume import tiny
from trainkit import CLI_TRAIN, TRAIN, ImportHold, finish, read_until, start_train

# 100 micro-batches a step: a step lasts long enough to press Ctrl-C twice within it.
LONG_STEPS = ("checkpoint.save_every=100", "train.grad_accum=100", "train.eval_every=100")


def start(
    out: Path, *extra: str, entry: tuple[str, ...] = TRAIN, hold: ImportHold | None = None
) -> subprocess.Popen[str]:
    return start_train(tiny(out, *extra), threads=1, entry=entry, hold=hold)


def valid_steps(out: Path) -> list[int]:
    with CheckpointManager(out) as mgr:
        return [c.step for c in mgr.list() if c.valid]


def test_first_ctrl_c_saves_and_exits_75_a_second_one_aborts_at_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    child = start(out, *LONG_STEPS)
    text = read_until(child, "step 1/")
    child.send_signal(signal.SIGINT)
    text += finish(child, timeout=120)
    assert child.returncode == 75, text
    assert "SIGINT: saving at the next step boundary, then exiting (SIGINT again: abort now)" in text
    stopped = int(text.split("stopped by SIGINT: step ")[1].split("/")[0])
    assert f"run the same command again to resume from {out / f'checkpoint-{stopped}'} (step {stopped})" in text
    assert "Traceback" not in text and valid_steps(out) == [stopped]

    # Resumed; Ctrl-C twice within one step: out at once, nothing new saved, no traceback.
    child = start(out, *LONG_STEPS)
    text = ctrl_c_twice_at(child, f"step {stopped + 1}/")
    assert child.returncode == 130, text
    assert "SIGINT: saving at the next step boundary, then exiting (SIGINT again: abort now)" in text
    assert text.endswith(
        f"error: aborted by a second SIGINT (Ctrl-C) without saving; the steps after step {stopped} are lost: "
        f"run the same command again to resume from {out / f'checkpoint-{stopped}'} (step {stopped})\n"
    )
    assert "Traceback" not in text and valid_steps(out) == [stopped]


def test_sigterm_during_start_up_stops_before_step_1_with_exit_75(tmp_path: Path) -> None:
    data, out = tmp_path / "small.jsonl", tmp_path / "run"
    data.write_text(json.dumps({"text": "to be, or not to be: that is the question"}) + "\n")
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text(json.dumps({"text": "whether 'tis nobler in the mind to suffer " * 3}) + "\n")
    child = start(out, f"data.train={data}", f"data.eval={held_out}")
    # printed while the data loads, before the model is built: the run is starting up
    text = read_until(child, "every step repeats blocks")
    child.send_signal(signal.SIGTERM)
    text += finish(child, timeout=120)
    assert child.returncode == 75, text
    assert (
        "warning: the training data makes 1 blocks of data.seq_len tokens, fewer than one step takes "
        "(4 = train.batch_size x train.grad_accum x ranks): every step repeats blocks" in text
    )
    assert "stopped by SIGTERM during start-up, before step 1\nnothing was saved yet; run the same command" in text
    assert "step 1/" not in text and valid_steps(out) == []


@pytest.mark.parametrize("entry", [TRAIN, CLI_TRAIN], ids=["python -m ckptguard.train", "python -m ckptguard train"])
def test_sigterm_while_torch_imports_stops_with_exit_75_not_killed(tmp_path: Path, entry: tuple[str, ...]) -> None:
    """The first seconds of a run are torch's import: a scheduler's SIGTERM then must not kill it (-15)."""
    out, hold = tmp_path / "run", ImportHold("torch", tmp_path)
    child = start(out, entry=entry, hold=hold)
    text = read_until(child, hold.line)  # held at `import torch`, as it is for seconds on a loaded machine
    child.send_signal(signal.SIGTERM)
    hold.release()
    text += finish(child, timeout=120)
    assert child.returncode == 75, text
    nothing_yet = "nothing was saved yet; run the same command again to start"
    assert text.endswith(f"stopped by SIGTERM during start-up, before step 1\n{nothing_yet}\n")
    assert "Traceback" not in text and valid_steps(out) == []


def ctrl_c_twice_at(child: subprocess.Popen[str], line: str) -> str:
    """Ctrl-C once the child prints `line`, again once it acknowledged the first; all it printed."""
    text = read_until(child, line)
    child.send_signal(signal.SIGINT)
    text += read_until(child, "SIGINT: ")
    child.send_signal(signal.SIGINT)
    return text + finish(child, timeout=60)


def test_ctrl_c_twice_while_torch_imports_aborts_with_130_and_no_traceback(tmp_path: Path) -> None:
    out, hold = tmp_path / "run", ImportHold("torch", tmp_path)
    child = start(out, hold=hold)
    text = ctrl_c_twice_at(child, hold.line)
    assert child.returncode == 130, text
    assert text.endswith(
        "aborted by a second SIGINT (Ctrl-C) during start-up, before any step; nothing was lost: run the same "
        "command again to go on\n"
    )
    assert "Traceback" not in text and not out.exists()


def test_ctrl_c_twice_after_done_says_nothing_was_lost(tmp_path: Path) -> None:
    out, hold = tmp_path / "run", ImportHold("matplotlib", tmp_path)
    child = start(out, "train.max_steps=5", hold=hold)
    text = ctrl_c_twice_at(child, hold.line)  # "done" is printed; the report is being written
    assert child.returncode == 130, text
    assert "done: step 5/5" in text
    assert "SIGINT: the run is ending already (SIGINT again: abort now)" in text
    final = out / "checkpoint-5"
    assert text.endswith(
        f"aborted by a second SIGINT (Ctrl-C); nothing was lost: the run is complete, its final checkpoint is "
        f"{final} (step 5)\n"
    )
    assert "Traceback" not in text and valid_steps(out) == [5]


def test_ctrl_c_during_the_cleanup_after_a_stop_names_the_checkpoint_it_saved(tmp_path: Path) -> None:
    out, hold = tmp_path / "run", ImportHold("matplotlib", tmp_path)
    child = start(out, hold=hold)
    text = read_until(child, "step 2/")
    child.send_signal(signal.SIGINT)  # stop: save at the next step boundary
    text += read_until(child, hold.line)  # saved, summary printed; the report is being written
    child.send_signal(signal.SIGINT)
    text += finish(child, timeout=60)
    assert child.returncode == 130, text
    stopped = int(text.split("stopped by SIGINT: step ")[1].split("/")[0])
    assert f"saved checkpoint-{stopped} " in text
    assert text.endswith(
        "aborted by a second SIGINT (Ctrl-C); nothing was lost: run the same command again to resume from "
        f"{out / f'checkpoint-{stopped}'} (step {stopped})\n"
    )
    assert "Traceback" not in text and max(valid_steps(out)) == stopped
