"""Power-cut trials: save on the power-cut filesystem, cut at a random instant, reboot, resume, judge.

One trial: a child process (forked by faultkit's zygote, so torch and PEFT are imported once)
resumes from the run directory on the powerfs mount and saves step after step; before each save it
appends ``begin STEP`` and once the save is acknowledged ``ack STEP`` to a side file outside the
mount, fsynced. After a random delay the child is SIGKILLed and the power is cut (everything not
fsynced is gone; on every other cut a random share of it was written back first, a file perhaps
torn), the filesystem is mounted again ("reboot"), and a fresh child judges the disk:

* lost: an acknowledged step (or the step the trial resumed from) that no longer verifies, although
  fewer than KEEP_LAST newer valid checkpoints exist (only those let retention remove it);
* broken load: resume loads something other than the newest valid checkpoint, or content that is
  not what that step saved, or fails;
* bad LATEST: LATEST names a checkpoint that does not verify;
* dirty: the run cannot be opened again (lock), or startup leaves staging/trash/probe litter.

The run directory carries over from trial to trial, like a job that loses power again and again.
Modes: ckptguard's blocking and background saves, ``save_lora_adapters``, the trainer
(``ckptguard train``), a naive saver (PEFT ``save_pretrained`` + ``torch.save``, no fsync, resume
from the highest ``checkpoint-N``) and ckptguard with one fsync removed (BROKEN_FSYNC). The last
two must fail: that is what shows the trials can tell.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import random
import re
import shutil
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# peft, transformers' Llama and the trainer are imported here only so that the zygote loads them once
# for every forked child (transformers loads lazily).
import peft  # noqa: F401
import torch
import transformers.models.llama.modeling_llama  # noqa: F401
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

import ckptguard.train.recipe  # noqa: F401
from ckptguard import CheckpointManager, load_lora_adapters, save_lora_adapters, verify_checkpoint
from ckptguard.cli.main import main as cli_main
from conftest import make_lora_model
from faultkit import CRASH_LITTER, STARTUP_LITTER, CrashHarness, StepState, committed_steps, expected_tensors
from powerkit import PowerFS, power_cut_disk

# The fsync the broken build loses, as a dotted name of what ckptguard calls: the data fsync of every
# checkpoint file, the writer's only os.fsync. A function name works too (e.g. "ckptguard.commit.publish.fsync_dir",
# every directory fsync of the commit protocol).
BROKEN_FSYNC = "ckptguard.files.writer.os.fsync"

KEEP_LAST = 3
MODES = ("blocking", "async", "lora", "trainer", "naive", "broken")
MUST_FAIL = ("naive", "broken")
# Kill after a uniform random delay up to this (s): a few saves of each mode on the FUSE mount.
MAX_DELAY_S = {"blocking": 1.0, "async": 1.0, "lora": 0.8, "trainer": 5.0, "naive": 1.0, "broken": 1.0}
CHECK_TIMEOUT_S = 120.0

_STEP_DIR = re.compile(r"checkpoint-(\d+)")


# --- the saving child --------------------------------------------------------------------------


def _quiet() -> None:
    """In a trial's child: no per-cut notices ("removed 1 unfinished save"); what matters comes back as counts."""
    logging.getLogger("ckptguard").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)  # inside PEFT


class _Acks:
    """The side file: ``begin STEP`` before a save, ``ack STEP`` once it is acknowledged; fsynced."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, kind: str, step: int) -> None:
        os.write(self._fd, f"{kind} {step}\n".encode())
        os.fsync(self._fd)


def _acknowledge_manager_saves(acks: _Acks) -> None:
    """Record when CheckpointManager reports a save done: save() returned it, or a later save()/wait() did."""
    acked: set[int] = set()

    def reporting(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(self: CheckpointManager, *args: Any, **kwargs: Any) -> Any:
            if method.__name__ == "save":
                acks.write("begin", args[0] if args else kwargs["step"])
            out = method(self, *args, **kwargs)
            for result in self.results:
                if result.step not in acked:
                    acked.add(result.step)
                    acks.write("ack", result.step)
            return out

        return wrapper

    CheckpointManager.save = reporting(CheckpointManager.save)  # type: ignore[method-assign]
    CheckpointManager.wait = reporting(CheckpointManager.wait)  # type: ignore[method-assign]


class _OsWithout(types.ModuleType):
    """The os module with one function replaced: what a module that lost one call sees."""

    def __init__(self, name: str, replacement: Callable[..., Any]) -> None:
        super().__init__("os")
        setattr(self, name, replacement)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def remove_fsync(target: str | None = None) -> None:
    """Make `target` (default BROKEN_FSYNC; ``pkg.module.function`` or ``pkg.module.os.fsync``) a no-op here."""
    parts = (target or BROKEN_FSYNC).split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
            break
        except ImportError:
            continue
    attribute, rest = parts[cut], parts[cut + 1 :]
    if rest:  # the module's own view of `os`: only its calls lose the fsync
        setattr(owner, attribute, _OsWithout(rest[-1], lambda *args: None))
    else:
        setattr(owner, attribute, lambda *args, **kwargs: True)


def save_until_killed(mode: str, run_dir: str, acks: str) -> None:
    """Resume from `run_dir` and save step after step in the way `mode` names, until killed."""
    _quiet()
    log = _Acks(acks)
    if mode == "broken":
        remove_fsync()
    if mode in ("blocking", "async", "broken", "trainer"):
        _acknowledge_manager_saves(log)
    if mode == "trainer":
        _train(run_dir)
    elif mode == "lora":
        _save_adapters(Path(run_dir), log, ckptguard=True)
    elif mode == "naive":
        _save_adapters(Path(run_dir), log, ckptguard=False)
    else:
        _save_state(run_dir, async_save=mode == "async")


def _save_state(run_dir: str, *, async_save: bool) -> None:
    model = StepState()
    with CheckpointManager(run_dir, keep_last=KEEP_LAST) as mgr:
        restored = mgr.restore({"model": model, "step": 0})
        step = restored.step if restored is not None else 0
        while True:
            step += 1
            model.advance(step)  # in place, right after a background save returned: its snapshot must not alias
            mgr.save(step, {"model": model, "step": step}, blocking=not async_save)
            if async_save and step % 3 == 0:
                mgr.wait()


def _train(run_dir: str) -> None:
    overrides = {
        "checkpoint.output_dir": run_dir,
        "checkpoint.save_every": 1,
        "train.max_steps": 1_000_000,
        "train.batch_size": 4,
        "train.eval_every": 1_000_000,
        "train.eval_batches": 1,
        "train.log_every": 1_000_000,
        "train.progress_bar": "false",
        "data.seq_len": 64,
    }
    code = cli_main(["train", *(a for k, v in overrides.items() for a in ("--set", f"{k}={v}"))])
    raise RuntimeError(f"ckptguard train exited with status {code} before it was killed")


def _lora_weights(model: Any, step: int) -> None:
    """Give every LoRA tensor values that are a function of the step."""
    with torch.no_grad():
        for i, (name, param) in enumerate(sorted(model.named_parameters())):
            if "lora_" in name:
                param.copy_(torch.arange(param.numel(), dtype=param.dtype).reshape(param.shape) * 1e-3 + step + i)


def _lora_matches(model: Any, step: int) -> bool:
    want = make_lora_model()
    _lora_weights(want, step)
    expected = dict(want.named_parameters())
    return all(torch.equal(p, expected[n]) for n, p in model.named_parameters() if "lora_" in n)


def _save_adapters(run_dir: Path, acks: _Acks, *, ckptguard: bool) -> None:
    """A LoRA training script's save loop: an adapter (and, naively, the optimizer) per checkpoint-N."""
    model = make_lora_model()
    step = (_resume_lora if ckptguard else _resume_naive)(run_dir)[0]
    while True:
        step += 1
        _lora_weights(model, step)
        target = run_dir / f"checkpoint-{step}"
        acks.write("begin", step)
        if ckptguard:
            save_lora_adapters(model, target)
        else:  # what the trainer this project replaces did: no fsync anywhere
            model.save_pretrained(target)
            torch.save(expected_tensors(step), target / "optimizer.pt")
        acks.write("ack", step)
        for old in _step_dirs(run_dir)[:-KEEP_LAST]:  # save_total_limit
            shutil.rmtree(old[1], ignore_errors=True)


# --- judging after the reboot ------------------------------------------------------------------


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def _naive_load(path: Path) -> bool:
    """Load a naive checkpoint the way its trainer would; True only if it holds exactly what its step saved."""
    step = int(_STEP_DIR.fullmatch(path.name).group(1))  # type: ignore[union-attr]
    try:
        model = make_lora_model()
        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
        state = torch.load(path / "optimizer.pt", weights_only=True)
    except Exception:
        return False
    want = expected_tensors(step)
    return (
        _lora_matches(model, step) and state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    )


def _resume_naive(run_dir: Path) -> tuple[int, str | None]:
    """Resume from the highest checkpoint-N by name, as naive trainers do; (step, why the load broke)."""
    dirs = _step_dirs(run_dir)
    if not dirs:
        return 0, None
    step, path = dirs[-1]
    return (step, None) if _naive_load(path) else (0, f"{path.name} does not load what step {step} saved")


def _resume_lora(run_dir: Path) -> tuple[int, str | None]:
    """Load the newest adapter that verifies with load_lora_adapters; (step, why the load broke)."""
    valid = [(s, p) for s, p in _step_dirs(run_dir) if verify_checkpoint(p, level="full").ok]
    if not valid:
        return 0, None
    step, path = valid[-1]
    model = make_lora_model()
    try:
        load_lora_adapters(model, path)
    except Exception as exc:
        return step, f"load_lora_adapters({path.name}) raised {exc!r}"
    return step, None if _lora_matches(model, step) else f"{path.name} loaded weights not of step {step}"


def _resume_manager(run_dir: Path, *, trainer: bool) -> tuple[int, str | None, list[str]]:
    """Open the run as after a kill and restore; (step, why the load broke, litter left after startup)."""
    with CheckpointManager(run_dir) as mgr:
        litter = sorted(p.name for p in run_dir.iterdir() if p.name.startswith(CRASH_LITTER + STARTUP_LITTER))
        if trainer:  # the trainer's own resume runs in the next trial; here: what it would pick
            latest = mgr.latest()
            return (latest.step if latest else 0), None, litter
        model = StepState(-1)
        restored = mgr.restore({"model": model, "step": 0})
    if restored is None:
        return 0, None, litter
    if restored.values != {"step": restored.step} or not model.matches(restored.step):
        return restored.step, f"restored {restored.path.name} does not hold what step {restored.step} saved", litter
    return restored.step, None, litter


def _lost(acked: list[int], floor: int, valid: list[int]) -> list[int]:
    """Acknowledged steps (and the resume point) gone although retention had no reason to remove them.

    Retention removes a checkpoint only after KEEP_LAST newer ones were committed: a missing step is
    lost unless that many newer steps are valid now or were acknowledged (and so must be valid).
    """
    known = {*acked, floor, *valid} - {0}
    return sorted(a for a in {*acked, floor} - {0} if a not in valid and sum(b > a for b in known) < KEEP_LAST)


def check_after_reboot(mode: str, run_dir: str, acks: str, floor: int) -> None:
    """Judge the rebooted disk and resume; prints ``result {json}`` (see the module docstring)."""
    _quiet()
    root = Path(run_dir)
    lines = [line.split() for line in Path(acks).read_text().splitlines()]
    acked = [int(step) for kind, step in lines if kind == "ack"]
    mid_save = bool(lines) and lines[-1][0] == "begin"
    valid = [s for s, p in _step_dirs(root) if _naive_load(p)] if mode == "naive" else committed_steps(root)
    lost = _lost(acked, floor, valid)
    latest = (root / "LATEST").read_text().strip() if (root / "LATEST").exists() else None
    bad_latest = latest is not None and latest not in {f"checkpoint-{v}" for v in valid}
    litter: list[str] = []
    dirty = None
    if mode == "naive":
        resumed, broken = _resume_naive(root)
    elif mode == "lora":
        resumed, broken = _resume_lora(root)
    else:
        try:
            resumed, broken, litter = _resume_manager(root, trainer=mode == "trainer")
        except Exception as exc:
            resumed, broken, dirty = 0, None, f"cannot open the run again: {exc!r}"
        if broken is None and dirty is None and resumed != max(valid, default=0):
            broken = f"resume picked step {resumed}, the newest valid checkpoint is {max(valid, default=0)}"
    report = {
        "acked": len(acked),
        "mid_save": mid_save,
        "lost": lost,
        "broken": broken,
        "bad_latest": latest if bad_latest else None,
        "dirty": dirty or (f"left after startup: {litter}" if litter else None),
        "resumed": resumed,
    }
    os.write(1, f"result {json.dumps(report)}\n".encode())


# --- the trials --------------------------------------------------------------------------------


@dataclass
class Tally:
    """Counts over the cuts of one mode."""

    mode: str
    cuts: int = 0
    mid_save: int = 0  # cuts that landed while a save was under way
    acked: int = 0
    lost: int = 0
    broken: int = 0
    bad_latest: int = 0
    dirty: int = 0
    errors: int = 0  # the saving child died of an exception (the trainer refusing to resume, ...)
    seconds: float = 0.0
    first_failures: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.lost + self.broken + self.bad_latest + self.dirty + self.errors

    def add(self, trial: int, report: dict[str, Any], error: str | None) -> None:
        self.cuts += 1
        self.mid_save += report["mid_save"]
        self.acked += report["acked"]
        self.lost += len(report["lost"])
        self.broken += report["broken"] is not None
        self.bad_latest += report["bad_latest"] is not None
        self.dirty += report["dirty"] is not None
        self.errors += error is not None
        problems = {k: report[k] for k in ("lost", "broken", "bad_latest", "dirty") if report[k]}
        if error is not None:
            problems["error"] = error
        if problems and len(self.first_failures) < 3:
            self.first_failures.append(f"cut {trial}: {problems}")

    def line(self) -> str:
        return (
            f"{self.mode:9} cuts={self.cuts} mid_save={self.mid_save} acknowledged={self.acked} lost={self.lost} "
            f"broken_loads={self.broken} bad_latest={self.bad_latest} dirty={self.dirty} errors={self.errors} "
            f"time={self.seconds:.1f}s"
        )


def trials(where: Path, mode: str, cuts: int, seed: int, harness: CrashHarness, *, after_an_ack: bool = False) -> Tally:
    """`cuts` power cuts of `mode` on a fresh powerfs under `where`; the counts.

    `after_an_ack`: each cut's random delay counts from the first acknowledged save of its run, so a
    short run on a loaded machine still cuts after acknowledged saves (the full run cuts anywhere).
    """
    rng = random.Random(seed)
    tally = Tally(mode)
    start = time.monotonic()
    (where / "disk" / "run").mkdir(parents=True)  # before the mount: durable, as a launcher leaves it
    acks = where / "acks"
    with power_cut_disk(where) as fs:
        run_dir, floor = str(fs.mountpoint / "run"), 0
        for i in range(cuts):
            acks.write_text("")
            clock = {"kill_clock_starts_at": [str(acks), "ack "]} if after_an_ack else {}
            saver = harness.call("powercut:save_until_killed", rng.uniform(0.0, MAX_DELAY_S[mode]), mode=mode,
                                 run_dir=run_dir, acks=str(acks), **clock)  # fmt: skip
            writeback = 0.0 if i % 2 == 0 else rng.random()  # half the cuts: exactly the POSIX minimum
            fs.cut(writeback, seed=rng.randrange(1 << 30))
            report = _reboot_and_check(fs, harness, mode, run_dir, acks, floor)
            tally.add(i, report, None if saver.killed else saver.error() or "ended before the cut")
            floor = report["resumed"]
    tally.seconds = time.monotonic() - start
    return tally


def _reboot_and_check(fs: PowerFS, harness: CrashHarness, mode: str, run_dir: str, acks: Path, floor: int) -> dict:
    fs.mount()
    check = harness.call("powercut:check_after_reboot", CHECK_TIMEOUT_S, mode=mode, run_dir=run_dir,
                         acks=str(acks), floor=floor)  # fmt: skip
    results = [json.loads(line[7:]) for line in check.lines if line.startswith("result ")]
    if not results:
        raise RuntimeError(f"the check after the reboot gave no result ({check.error() or 'killed'}): {check.lines}")
    return results[-1]
