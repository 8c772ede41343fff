"""Direct-to-remote saving (``storage_options={"mode": "direct"}``): files go from memory to the bucket,
hashed as they are sent, and are committed by the same marker protocol; nothing is written locally."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from ckptguard import CheckpointManager
from ckptguard.commit import remote_publish
from ckptguard.errors import UploadError
from ckptguard.files.events import read_events
from ckptguard.format.layout import MARKER_NAME
from ckptguard.s3.lease import holder
from ckptguard.s3.objectstore import ObjectStore
from conftest import make_training_state
from s3kit import RemoteRun, kill_writer_mid_upload, wait_for
from test_tiered import WEIGHTS

# Saves a small step 1, then a 48 MiB step 2 straight from memory; killed while step 2 is in flight.
_WRITER = """
import sys, torch
from ckptguard import CheckpointManager
url, local = sys.argv[1:]
options = {"mode": "direct", "local_dir": local, "lease_ttl_s": 10, "chunk_bytes": 5 << 20}
mgr = CheckpointManager(url, storage_options=options)
mgr.save(1, {"model": torch.nn.Linear(4, 4)})
print("uploading", flush=True)
mgr.save(2, {"model": torch.nn.Linear(3072, 4096)})
print("committed", flush=True)
sys.stdin.read()  # until killed
"""


def committed(remote: RemoteRun) -> list[str]:
    return sorted(k.split("/")[0] for k in remote.objects() if k.endswith(f"/{MARKER_NAME}"))


def test_direct_saves_write_no_local_checkpoint_and_a_fresh_machine_resumes_from_the_bucket(
    tmp_path: Path, remote: RemoteRun
) -> None:
    options = {"mode": "direct", "local_dir": str(tmp_path / "local")}
    state = make_training_state(seed=1)
    with CheckpointManager(remote.url, keep_last=2, storage_options=options) as mgr:
        mgr.save(1, state, {"loss": 1.0})
        mgr.save(2, state, {"loss": 0.5})
        assert mgr.save(3, state, {"loss": 0.25}, blocking=False) is None  # in the background, from host buffers
    assert [r.path for r in mgr.results] == [f"{remote.url}/checkpoint-{s}" for s in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == [
        ".ckptguard.lock",
        ".ckptguard.lock.owner",
        "events.jsonl",
    ]
    assert committed(remote) == ["checkpoint-2", "checkpoint-3"]  # keep_last is the bucket's retention here
    saves = [e for e in read_events(tmp_path / "local") if e["event"] == "save"]
    assert [e["verify"] for e in saves] == ["quick"] * 3  # what was checked: the listing, not a re-read
    report = remote_publish.verify(ObjectStore(remote.url), "checkpoint-3", "full")
    assert report.ok and report.bytes_read == mgr.results[-1].bytes
    with CheckpointManager(tmp_path / "plain") as plain:  # the same bytes as a local save of the same state
        plain.save(3, state, {"loss": 0.25})
    local_files = json.loads((tmp_path / "plain" / "checkpoint-3" / "MANIFEST.json").read_text())["files"]
    assert json.loads(remote.read("checkpoint-3/MANIFEST.json"))["files"] == local_files
    fresh = make_training_state(seed=2)
    with CheckpointManager(remote.url, storage_options={**options, "local_dir": str(tmp_path / "b")}) as mgr:
        restored = mgr.restore(fresh)
    assert restored is not None and restored.step == 3 and restored.metrics == {"loss": 0.25}
    for a, b in zip(state["model"].parameters(), fresh["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    with CheckpointManager(remote.url, storage_options={**options, "local_dir": str(tmp_path / "c")}) as mgr:
        assert mgr.restore(fresh, step=2).metrics == {"loss": 0.5}  # type: ignore[union-attr]  # named: fetched


def test_sigkill_mid_direct_upload_leaves_nothing_committed_and_resume_takes_the_previous(
    tmp_path: Path, slow_remote: RemoteRun
) -> None:
    remote = slow_remote
    dead = kill_writer_mid_upload(remote, _WRITER, remote.url, str(tmp_path / "a"))
    left = remote.objects("checkpoint-2/")
    assert f"checkpoint-2/{WEIGHTS}" not in left and f"checkpoint-2/{MARKER_NAME}" not in left
    assert not list((tmp_path / "a").glob("checkpoint-*"))  # nothing of either save on local disk
    held = holder(ObjectStore(remote.url))
    assert held is not None and held[0] == dead and held[1] > time.time()  # within its TTL, but its process is gone
    options = {"mode": "direct", "local_dir": str(tmp_path / "b"), "lease_ttl_s": 10, "lease_wait_s": 0}
    with CheckpointManager(remote.url, storage_options=options) as mgr:  # takes the dead writer's lease over at once
        restored = mgr.restore({"model": torch.nn.Linear(4, 4)})
    assert restored is not None and restored.step == 1
    assert remote.objects("checkpoint-2/") == {}  # the uncommitted upload was removed by the new writer


def test_link_cut_mid_direct_upload_is_an_upload_error_and_earlier_checkpoints_stay_committed(
    tmp_path: Path, slow_remote: RemoteRun
) -> None:
    remote, server = slow_remote, slow_remote.server
    options = {
        "mode": "direct", "local_dir": str(tmp_path / "local"), "connect_timeout": 1, "read_timeout": 5,
        "max_attempts": 1, "chunk_bytes": 5 << 20,
    }  # fmt: skip
    mgr = CheckpointManager(remote.url, storage_options=options)
    mgr.save(1, make_training_state())
    assert mgr.save(2, {"model": torch.nn.Linear(3072, 4096)}, blocking=False) is None
    wait_for(lambda: remote.objects("checkpoint-2/"), "the first object of save 2")
    server.cut_link()  # every connection drops; the server and its objects stay, for the checks below
    with pytest.raises(UploadError, match="could not upload checkpoint-2") as raised:
        mgr.wait()
    assert "earlier checkpoints in the bucket are intact" in raised.value.remedy
    assert raised.value.step == 2 and str(raised.value.path).endswith("/exp/run/checkpoint-2")
    assert committed(remote) == ["checkpoint-1"]
    inside = ObjectStore(remote.url, {"endpoint_url": server.inside})
    assert remote_publish.verify(inside, "checkpoint-1", "full").ok
    failed = [e for e in read_events(tmp_path / "local") if e["event"] == "save_failed"]
    assert [(e["step"], e["error"]) for e in failed] == [(2, "UploadError")]
    mgr.close()  # the lease cannot be released over a cut link: a warning, not an error


# One process, an FSDP2 model and its optimizer, a direct-mode manager: restore and save must both refuse.
_SHARDED_DIRECT = """
import json, os, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from ckptguard import CheckpointManager
from ckptguard.errors import UnsupportedStateError
url, local = sys.argv[1:]
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
state = {"model": model, "optimizer": torch.optim.AdamW(model.parameters())}
refused = []
with CheckpointManager(url, storage_options={"mode": "direct", "local_dir": local}) as mgr:
    for call in (lambda: mgr.restore(state), lambda: mgr.save(1, state)):
        try:
            call()
        except UnsupportedStateError as exc:
            refused.append([exc.message, exc.step, str(exc.path)])
print(json.dumps(refused))
dist.destroy_process_group()
"""


def test_sharded_state_in_direct_mode_is_refused_at_restore_and_save_and_nothing_is_committed(
    tmp_path: Path, remote: RemoteRun
) -> None:
    """Direct mode sends files from memory; DCP writes shards into a directory. Committing without them made a
    checkpoint every resume skipped as corrupt (start over from step 0): refused before step 1 instead."""
    import subprocess
    import sys

    from faultkit import free_port
    from s3kit import child_env

    env = {**child_env(remote.server), "PORT": str(free_port())}
    done = subprocess.run(
        [sys.executable, "-c", _SHARDED_DIRECT, remote.url, str(tmp_path / "local")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    refused = json.loads(done.stdout.strip().splitlines()[-1])
    assert [step for _, step, _ in refused] == [None, 1]  # restore (before step 1), then save
    for message, _, path in refused:
        assert message.startswith("FSDP2 (sharded) state cannot be saved in direct-to-bucket mode")
        assert path == remote.url
    assert committed(remote) == []  # nothing sent
