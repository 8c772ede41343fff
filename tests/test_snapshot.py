"""snapshot.py: what cannot be saved is refused before anything is written, the same on both paths;
odd but legal values (non-finite metrics) are saved."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ckptguard import CheckpointManager, UnsupportedStateError, verify_checkpoint
from ckptguard.files.events import read_events
from conftest import make_training_state

UNSUPPORTED = {
    "meta tensor": (lambda: torch.empty(4, device="meta"), "meta device"),
    "sparse tensor": (lambda: torch.eye(3).to_sparse(), "is sparse"),
    "complex tensor": (lambda: torch.zeros(2, dtype=torch.complex64), "safetensors cannot store"),
    "a function": (lambda: print, "without pickle"),
}


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "async"])
@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_state_is_refused_before_anything_is_written(tmp_path: Path, case: str, blocking: bool) -> None:
    make, message = UNSUPPORTED[case]
    run = tmp_path / "run"
    with CheckpointManager(run) as mgr:
        with pytest.raises(UnsupportedStateError, match=message) as info:
            mgr.save(3, {"weights": {"x": make()}}, blocking=blocking)
        assert "'weights'" in str(info.value) or "state/weights" in str(info.value), info.value
        assert info.value.step == 3
        mgr.save(4, make_training_state(), blocking=blocking)  # the manager is still usable
        mgr.wait()
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "LATEST",
        "checkpoint-4",
        "events.jsonl",
    ]
    failed = [e for e in read_events(run) if e["event"] == "save_failed"]
    assert [(e["step"], e["error"]) for e in failed] == [(3, "UnsupportedStateError")]


def test_a_non_finite_metric_is_saved_and_never_chosen_as_best(tmp_path: Path) -> None:
    state = make_training_state()
    with CheckpointManager(tmp_path / "run", keep_last=1, keep_best=1, metric="loss") as mgr:
        mgr.save(1, state, metrics={"loss": 2.0})
        mgr.save(2, state, metrics={"loss": math.nan})
        mgr.save(3, state, metrics={"loss": -math.inf})
        mgr.save(4, state, metrics={"loss": math.inf})
        kept = {c.name: c for c in mgr.list()}
    assert set(kept) == {"checkpoint-1", "checkpoint-4"}, "best is the finite 2.0; newest is 4"
    assert "best loss" in kept["checkpoint-1"].keep_reasons
    assert math.isinf(kept["checkpoint-4"].metrics["loss"])
    assert verify_checkpoint(tmp_path / "run" / "checkpoint-4", "full").ok
    with CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore(make_training_state(seed=1)).metrics["loss"] == math.inf


def test_a_metric_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "run") as mgr, pytest.raises(UnsupportedStateError, match="'loss' is 'low'"):
        mgr.save(1, make_training_state(), metrics={"loss": "low"})
