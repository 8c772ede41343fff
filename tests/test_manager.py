"""manager.py: round trips, never overwriting in place, timelines, retention, plain values, RNG."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ckptguard import CheckpointError, CheckpointManager, CorruptCheckpointError, RNGState, per_rank, verify_checkpoint
from ckptguard.files.events import read_events
from conftest import make_training_state


def assert_same_state(a: dict, b: dict) -> None:
    for (ka, va), (kb, vb) in zip(a["model"].state_dict().items(), b["model"].state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    sa, sb = a["optimizer"].state_dict(), b["optimizer"].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for idx, entry in sa["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, sb["state"][idx][key]), (idx, key)
    assert a["scheduler"].state_dict() == b["scheduler"].state_dict()


def test_model_adamw_and_scheduler_restore_bit_identical(tmp_path):
    state = make_training_state(steps=5)
    with CheckpointManager(tmp_path / "run") as mgr:
        result = mgr.save(5, state, metrics={"loss": 0.5})
    assert result.path.name == "checkpoint-5" and result.bytes > 0
    fresh = make_training_state(seed=7, steps=1)
    with CheckpointManager(tmp_path / "run") as mgr:
        restored = mgr.restore(fresh)
    assert restored.step == 5 and restored.metrics == {"loss": 0.5}
    assert_same_state(state, fresh)
    # and training continues identically from both
    for s in (state, fresh):
        torch.manual_seed(3)
        s["model"](torch.randn(4, 16)).sum().backward()
        s["optimizer"].step()
    assert_same_state(state, fresh)


def test_plain_values_come_back_in_restored_values_and_callers_dict_is_untouched(tmp_path):
    state = {"progress": {"epoch": 2, "offset": 17, "order": [3, 1, 2]}, "note": "x"}
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, state)
        restored = mgr.restore({"progress": None, "note": None})
    assert restored.values == {"progress": {"epoch": 2, "offset": 17, "order": [3, 1, 2]}, "note": "x"}
    assert state == {"progress": {"epoch": 2, "offset": 17, "order": [3, 1, 2]}, "note": "x"}


def test_rng_state_restore_reproduces_the_next_draws(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"rng": per_rank(RNGState())})
        expected = (random.random(), np.random.rand(), torch.rand(3))
        random.seed(9), np.random.seed(9), torch.manual_seed(9)
        mgr.restore({"rng": per_rank(RNGState())})
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert (tmp_path / "run/checkpoint-1/state/rank0/rng.json").exists()


def test_existing_checkpoint_name_is_renamed_aside_never_overwritten(tmp_path):
    state = make_training_state()
    with CheckpointManager(tmp_path / "run") as mgr:
        first = mgr.save(10, state).path
        old_bytes = (first / "state/model.safetensors").read_bytes()
        with torch.no_grad():
            state["model"][0].bias.add_(1)
        mgr.save(10, state)
    aside = [p for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint-10.superseded-")]
    assert len(aside) == 1 and (aside[0] / "state/model.safetensors").read_bytes() == old_bytes
    assert verify_checkpoint(tmp_path / "run/checkpoint-10").ok
    assert any(e["event"] == "superseded" for e in read_events(tmp_path / "run"))


def test_after_explicit_resume_from_older_step_the_new_timeline_wins(tmp_path):
    state = make_training_state()
    with CheckpointManager(tmp_path / "run") as mgr:
        for step in (100, 200, 300):
            mgr.save(step, state, metrics={"tag": float(step)})
    with CheckpointManager(tmp_path / "run") as mgr:  # user goes back to step 100 on purpose
        assert mgr.restore(state, step=100).step == 100
        mgr.save(150, state, metrics={"tag": 150.0})
    with CheckpointManager(tmp_path / "run") as mgr:  # a crash later: auto-resume must take 150, not 300
        restored = mgr.restore(state)
    assert restored.step == 150
    assert (tmp_path / "run/LATEST").read_text().strip() == "checkpoint-150"


def test_retention_keeps_last_best_and_every_nth_and_says_why(tmp_path):
    state = {"x": torch.ones(4)}
    losses = {10: 0.9, 20: 0.1, 30: 0.5, 40: 0.7, 50: 0.6, 60: 0.8}
    with CheckpointManager(tmp_path / "run", keep_last=2, keep_best=1, metric="loss", keep_every=30) as mgr:
        for step, loss in losses.items():
            mgr.save(step, state, metrics={"loss": loss})
        kept = {c.step: c.keep_reasons for c in mgr.list()}
    assert set(kept) == {20, 30, 50, 60}
    assert kept[20] == ("best loss",) and kept[30] == ("every 30",)
    assert "newest" in kept[60] and "last 2" in kept[50]
    assert any(e["event"] == "prune" and e["step"] == 10 for e in read_events(tmp_path / "run"))


def test_close_returns_once_pruned_checkpoints_are_freed_leaving_no_trash(tmp_path):
    """Pruning frees space in the background; close waits for it, so no thread deletes in a closed run."""
    state = {"x": torch.ones(4)}
    with CheckpointManager(tmp_path / "run", keep_last=1) as mgr:
        first = mgr.save(1, state).path
        for i in range(20_000):  # slow to delete: still deleting when the next save returns
            (first / f"extra-{i}").touch()
        mgr.save(2, state)
    assert not list((tmp_path / "run").glob(".trash-*"))


def test_checkpoint_resumed_from_is_never_pruned(tmp_path):
    state = {"x": torch.ones(4)}
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, state)
    with CheckpointManager(tmp_path / "run", keep_last=1) as mgr:
        mgr.restore(state)
        mgr.save(2, state)
        mgr.save(3, state)
        kept = {c.step: c.keep_reasons for c in mgr.list()}
    assert kept == {1: ("resumed from",), 3: ("newest", "last 1")}


def test_unsaveable_state_fails_before_anything_is_written(tmp_path):
    with CheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(ValueError, match="without pickle"):
            mgr.save(1, {"bad": {"fn": print}})
        with pytest.raises(ValueError, match="entry name"):
            mgr.save(1, {"../evil": 1})
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == ["events.jsonl"]


def test_restore_with_nothing_saved_returns_none_and_named_step_raises(tmp_path):
    from ckptguard import CheckpointNotFoundError

    with CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore({"x": None}) is None and mgr.latest() is None
        with pytest.raises(
            CheckpointNotFoundError,
            match=r"no checkpoint directory at the requested step \(valid steps here: none\)",
        ):
            mgr.restore({"x": None}, step=5)


def test_restore_refuses_a_state_key_the_checkpoint_does_not_have(tmp_path):
    from ckptguard import CheckpointError

    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"x": 1})
        with pytest.raises(CheckpointError, match=r"no entry 'optimizer' \(it holds \['x'\]\)"):
            mgr.restore({"x": None, "optimizer": make_training_state()["optimizer"]})


def test_events_log_has_bytes_and_seconds_for_each_save(tmp_path):
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"x": torch.ones(10)})
    saves = [e for e in read_events(tmp_path / "run") if e["event"] == "save"]
    assert saves and saves[0]["bytes"] > 0 and saves[0]["seconds"] > 0 and saves[0]["step"] == 1


def test_a_closed_manager_refuses_to_change_the_run_directory(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep_last=1)
    mgr.save(1, {"w": torch.ones(2)})
    mgr.close()
    with CheckpointManager(tmp_path / "run", keep_last=5) as owner:  # another writer now owns the directory
        owner.save(2, {"w": torch.ones(2)})
        for call in (lambda: mgr.prune(), lambda: mgr.restore({"w": torch.zeros(2)}), lambda: mgr.save(3, {})):
            with pytest.raises(CheckpointError, match="closed CheckpointManager"):
                call()
        assert [c.step for c in owner.list()] == [1, 2], "the closed manager deleted nothing"
    assert [c.step for c in mgr.list()] == [1, 2], "reading stays allowed"


def test_a_failed_save_is_logged_once_without_a_second_traceback(tmp_path, caplog):
    with CheckpointManager(tmp_path / "run") as mgr, pytest.raises(CheckpointError):
        mgr.save(1, {"bad": {"fn": print}})
    records = [r for r in caplog.records if r.name == "ckptguard" and r.levelname == "ERROR"]
    assert len(records) == 1 and records[0].exc_info is None


def test_a_state_file_of_another_format_version_is_not_loaded_and_resume_takes_the_previous(tmp_path):
    """A trainer_state.json that passes every hash but records a format this version does not read (a newer
    ckptguard's save): never interpreted as today's format."""
    import json

    from ckptguard.format.layout import STATE_FILE
    from faultkit import forge_file

    run = tmp_path / "run"
    with CheckpointManager(run) as mgr:
        mgr.save(1, {"w": torch.zeros(4)})
        mgr.save(2, {"w": torch.ones(4)})
    doc = json.loads((run / "checkpoint-2" / STATE_FILE).read_bytes())
    forge_file(run / "checkpoint-2", STATE_FILE, json.dumps(doc | {"format_version": 2}).encode())
    with CheckpointManager(run) as mgr:
        restored = mgr.restore({"w": None})
        assert restored.step == 1 and torch.equal(restored.values["w"], torch.zeros(4))
        with pytest.raises(CorruptCheckpointError, match="format_version 2; this ckptguard reads 1"):
            mgr.restore({"w": None}, path=run / "checkpoint-2")
