"""Resume from a bucket falls back like a local run does: a newest checkpoint that cannot be had intact
or does not load is skipped, with the reason logged, on a fresh machine too; a corrupt local copy
never shadows the bucket's intact one. Against a real S3 server on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptguard import CheckpointManager
from ckptguard.catalog.verify import verify_checkpoint
from ckptguard.files.events import read_events
from ckptguard.s3.objectstore import ObjectStore
from conftest import make_training_state
from s3kit import RemoteRun

WEIGHTS = "state/model.safetensors"
TRAINER_STATE = "state/trainer_state.json"


def _saved(tmp_path: Path, remote: RemoteRun, steps: tuple[int, ...] = (1, 2)) -> dict[int, dict[str, Any]]:
    """Save `steps` (each after one more update) through a tiered manager; returns each step's model tensors."""
    state = make_training_state()
    saved = {}
    with CheckpointManager(tmp_path / "local", remote=remote.url) as mgr:
        for step in steps:
            state["model"](torch.randn(8, 16)).pow(2).mean().backward()
            state["optimizer"].step()
            mgr.save(step, state)
            saved[step] = {k: v.clone() for k, v in state["model"].state_dict().items()}
    return saved


def _trainer_state_says_step_7(remote: RemoteRun) -> None:
    body = json.loads(remote.read(f"checkpoint-2/{TRAINER_STATE}"))
    body["step"] = 7
    remote.forge("checkpoint-2", {TRAINER_STATE: json.dumps(body).encode()})


HOSTILE = {
    "trainer-state-disagrees": _trainer_state_says_step_7,
    "300-byte-component": lambda remote: remote.forge("checkpoint-2", {f"state/{'a' * 300}": b"x"}),
    "file-and-directory": lambda remote: remote.forge("checkpoint-2", {f"{WEIGHTS}/inner": b"x"}),
}
REASON = {
    "trainer-state-disagrees": "step",
    "300-byte-component": "300-byte component (limit 255)",
    "file-and-directory": "listed both as a file and as the directory",
}


@pytest.mark.parametrize("damage", sorted(HOSTILE))
def test_fresh_machine_skips_a_bucket_checkpoint_that_cannot_load_for_the_previous_one(
    tmp_path: Path, remote: RemoteRun, damage: str
) -> None:
    saved = _saved(tmp_path, remote)
    HOSTILE[damage](remote)  # every hash of checkpoint-2 verifies: what stops it is what comes after them
    fresh = tmp_path / "fresh"
    state = make_training_state(seed=1)
    with CheckpointManager(fresh, remote=remote.url) as mgr:
        restored = mgr.restore(state)
    assert restored is not None and restored.step == 1
    assert all(torch.equal(v, saved[1][k]) for k, v in state["model"].state_dict().items())
    skipped = [e for e in read_events(fresh) if e["event"] == "resume_skip"]
    assert len(skipped) == 1 and skipped[0]["path"].endswith("checkpoint-2"), skipped
    assert REASON[damage] in skipped[0]["reason"], skipped


def test_fresh_machine_skips_a_checkpoint_whose_object_vanished_after_listing(
    tmp_path: Path, remote: RemoteRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    _saved(tmp_path, remote)
    download = ObjectStore.download_file

    def vanishing(store: ObjectStore, relpath: str, fh: Any) -> tuple[int, str]:
        if relpath == f"checkpoint-2/{WEIGHTS}":  # listed whole a moment ago; gone when its download starts
            remote.delete(relpath)
        return download(store, relpath, fh)

    monkeypatch.setattr(ObjectStore, "download_file", vanishing)
    fresh = tmp_path / "fresh"
    with CheckpointManager(fresh, remote=remote.url) as mgr:
        restored = mgr.restore(make_training_state(seed=1))
    assert restored is not None and restored.step == 1
    skipped = [e for e in read_events(fresh) if e["event"] == "resume_skip"]
    assert len(skipped) == 1 and "listed in the manifest but gone" in skipped[0]["reason"], skipped
    assert not [p for p in fresh.iterdir() if p.name.startswith((".staging", "checkpoint-2"))]


@pytest.mark.parametrize("explicit", [False, True], ids=["newest", "step=2"])
def test_a_corrupt_local_copy_does_not_shadow_the_intact_bucket_copy(
    tmp_path: Path, remote: RemoteRun, explicit: bool
) -> None:
    saved = _saved(tmp_path, remote)
    local = tmp_path / "local" / "checkpoint-2" / WEIGHTS
    data = bytearray(local.read_bytes())
    data[-1] ^= 1  # one bit, same size: only the hash can tell
    local.write_bytes(bytes(data))
    state = make_training_state(seed=1)
    with CheckpointManager(tmp_path / "local", remote=remote.url) as mgr:
        restored = mgr.restore(state, step=2 if explicit else None)
    assert restored is not None and restored.step == 2
    assert all(torch.equal(v, saved[2][k]) for k, v in state["model"].state_dict().items())
    assert verify_checkpoint(tmp_path / "local" / "checkpoint-2", "full").ok  # the bucket's copy, committed here
    aside = [p.name for p in (tmp_path / "local").iterdir() if p.name.startswith("checkpoint-2.")]
    assert len(aside) == 1, aside  # the damaged copy kept for inspection, not deleted
