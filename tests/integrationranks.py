"""Two-process runs of the integrations, and the kill loops the integration tests share.

``python integrationranks.py rank LIBRARY OUT MODE DISK`` is one rank of a two-rank (gloo) run; the
ranks are wired by :func:`faultkit.launch_ranks` as torchrun would wire them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from integrationkit import accelerate_run, hf_trainer, lightning_run, quiet_child, report_steps, resumed_step


def _rank(library: str, out: Path, mode: str, disk: str) -> None:
    """One rank of a two-process run (see :func:`ranks`); prints one JSON line with its outcome."""
    import json
    import sys
    import time

    from ckptguard.errors import CheckpointError

    quiet_child()
    fill = None
    if mode == "enospc" and os.environ["RANK"] == "0":
        from faultkit import Filler

        filler = Filler(Path(disk))

        def fill(step: int) -> None:
            if step == 2:
                while any(p.name.startswith(".trash-") for p in out.iterdir()):  # a replaced checkpoint, freeing
                    time.sleep(0.01)
                filler.leave_bytes(64 << 10)

    max_steps = {"enospc": 4, "train": 10_000, "resume": 0}[mode]
    try:
        if library == "hf":
            step = _hf_rank_run(out, mode, max_steps, fill)
        elif library == "lightning":  # "enospc" and "resume" both train to step 4
            run = lightning_run(
                out, guarded=True, max_steps=4, after_save=fill, resume="last", strategy="ddp", devices=2
            )
            step = run.started_at
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

    trainer = hf_trainer(out, callbacks=[report_steps(), AfterSave()], max_steps=max_steps or 1)
    return resumed_step(trainer, True if mode == "resume" else None)


def ranks(library: str, out: Path, mode: str, disk: Path | None = None) -> list[Any]:
    """Start a two-rank (gloo) run of `library` ("hf", "accelerate" or "lightning") on `out`: "train" saves
    every step until killed, "enospc" fills `disk` after step 2, "resume" only resumes (Lightning: and
    trains to step 4). Returns the rank processes."""
    import sys

    from faultkit import launch_ranks

    cmd = [sys.executable, __file__, "rank", library, str(out), mode, str(disk or "")]
    return launch_ranks([cmd, cmd])


def rank_outcomes(procs: list[Any], timeout: float = 600) -> list[dict[str, Any]]:
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


def random_kill_trials(
    harness: Any, run_dir: Path, saver: str, trials: int, delays: tuple[float, float]
) -> tuple[int, int]:
    """`trials` savers on `run_dir`, each SIGKILLed after a random delay in `delays`; each one resumes where the
    previous died, and must resume exactly at the newest checkpoint that verifies. Returns (killed, resumed):
    how many were killed rather than ending by themselves, and how many got as far as resuming."""
    import random

    from ckptguard import verify_checkpoint
    from faultkit import committed_steps

    rng = random.Random(trials)
    floor = killed = in_saves = 0
    for _ in range(trials):
        newest = max(committed_steps(run_dir), default=0)
        assert newest in (floor, floor + 1), f"checkpoint-{newest} is the newest valid one, {floor} was committed"
        trial = harness.trial(run_dir, rng.uniform(*delays), saver=saver, keep_last=2)
        assert trial.error is None, trial.error
        # start None: killed while it started up (a loaded machine), before it resumed anything
        assert trial.start in (None, newest), f"resumed at {trial.start}, checkpoint-{newest} is the newest verified"
        floor = trial.saved[-1] if trial.saved else newest
        killed += trial.killed
        in_saves += trial.start is not None
    named = [p for p in run_dir.iterdir() if p.name.startswith(("checkpoint-", "checkpoint_"))]  # HF's, Accelerate's
    damaged = [p for p in named if not verify_checkpoint(p).ok]
    assert not damaged, f"damaged checkpoints under a checkpoint name: {damaged}"
    return killed, in_saves


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
        sys.exit("usage: integrationranks.py rank hf|accelerate|lightning OUT train|enospc|resume DISK")
