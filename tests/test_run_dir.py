"""run_dir.py: the opened run hands out the save sequences, its retention removes through its committer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ckptguard import CheckpointManager
from ckptguard.catalog.discovery import discover
from ckptguard.dist import Coordinator
from ckptguard.files.events import EventLog
from ckptguard.integrations import staged


def _saved(run: Path, *steps: int, keep_last: int | None = None) -> None:
    with CheckpointManager(run, keep_last=keep_last) as mgr:
        for step in steps:
            mgr.save(step, {"w": torch.full((4,), float(step))})


def _library_save(run: Path, step: int) -> Path:
    """What an integration does around a library's own save: begin, the library writes, finish."""
    save = staged.begin(Coordinator.alone(), run, step)
    (save.path / "weights.bin").write_bytes(bytes([step]) * 64)
    return staged.finish(save, None)


def _sequences(run: Path) -> dict[str, int]:
    return {c.name: c.sequence for c in discover(run)}


def test_an_integrations_saves_in_an_opened_run_come_after_every_save_found_there(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _saved(run, 50, 10)  # a resume from step 10 after step 50: the later save is the newer one
    coord = Coordinator.alone()
    assert staged.open_run(coord, run)
    try:
        _library_save(run, 20)
        shutil.rmtree(run / "checkpoint-50")  # the run's own count goes on: a vanished save does not rewind it
        _library_save(run, 30)
    finally:
        staged.close_run(coord, run)
    assert _sequences(run) == {"checkpoint-10": 2, "checkpoint-20": 3, "checkpoint-30": 4}
    assert staged.newest_verified(run) == run / "checkpoint-30"


def test_a_save_into_a_directory_no_run_holds_comes_after_the_saves_found_there(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _saved(run, 5, 7)
    target = run / "step3.ckpt"  # an earlier step, saved later (Lightning's trainer.save_checkpoint outside fit)
    save = staged.begin_file(target, 3, EventLog(run, enabled=False))
    torch.save({"global_step": 3}, save.path)
    staged.finish(save, None)
    assert {c.name: c.sequence for c in discover(run)}[target.name] == 3
    assert staged.newest_verified(run) == target


def test_a_manager_reopening_the_run_continues_after_the_integrations_saves(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _saved(run, 1)
    coord = Coordinator.alone()
    staged.open_run(coord, run)
    try:
        _library_save(run, 2)
    finally:
        staged.close_run(coord, run)
    _saved(run, 3)
    assert _sequences(run) == {"checkpoint-1": 1, "checkpoint-2": 2, "checkpoint-3": 3}


def test_a_checkpoint_removed_by_hand_does_not_stop_retention_for_the_rest_of_the_run(tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run, keep_last=1) as mgr:
        mgr.save(1, {"w": torch.zeros(4)})
        shutil.rmtree(run / "checkpoint-1")  # someone removed it by hand: retention's rename of it fails
        result = mgr.save(2, {"w": torch.ones(4)})
        assert result.path == run / "checkpoint-2" and mgr.latest().name == "checkpoint-2"
        mgr.save(3, {"w": torch.ones(4)})  # the index kept nothing stale: step 2 goes now
    assert "checkpoint-1 was already gone when retention removed it" in caplog.text
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "prune"] == [1, 2]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3"]


def test_each_save_event_tells_the_bytes_kept_and_the_filesystems_room(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _saved(run, 1, 2, 3, keep_last=2)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    saves = [e for e in events if e["event"] == "save"]
    kept = {c.name: c.bytes for c in discover(run)}
    assert saves[-1]["checkpoint_bytes"] == sum(kept.values())  # after retention removed step 1
    assert 0 < saves[-1]["free_bytes"] <= saves[-1]["total_bytes"]
