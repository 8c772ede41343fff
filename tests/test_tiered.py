"""A manager on object storage: the s3:// URL form and its local tier, tiered saving under real faults (a
writer SIGKILLed mid-upload, the S3 server killed mid-upload), and the trainer and export on a bucket."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptguard import CheckpointManager, verify_checkpoint
from ckptguard.errors import UploadError
from ckptguard.files.events import read_events
from ckptguard.format.layout import MARKER_NAME
from ckptguard.s3.lease import holder
from ckptguard.s3.objectstore import ObjectStore
from conftest import make_training_state
from s3kit import RemoteRun, S3Server, kill_writer_mid_upload, new_run, use_server, wait_for

WEIGHTS = "state/model.safetensors"

# Saves step 1 (uploaded), then a 48 MiB step 2 whose upload is in flight when it prints "uploading".
_WRITER = """
import sys, torch
from ckptguard import CheckpointManager
local, url = sys.argv[1:]
mgr = CheckpointManager(local, remote=url, storage_options={"lease_ttl_s": 10, "chunk_bytes": 5 << 20})
state = {"model": torch.nn.Linear(3072, 4096)}
mgr.save(1, state)
mgr.save(2, state)  # waits for upload 1, commits 2 locally, starts upload 2
print("uploading", flush=True)
sys.stdin.read()  # until killed
"""


def test_sigkill_mid_upload_leaves_nothing_committed_and_resume_finds_the_newest_committed(
    tmp_path: Path, slow_remote: RemoteRun
) -> None:
    remote = slow_remote
    dead = kill_writer_mid_upload(remote, _WRITER, str(tmp_path / "a"), remote.url)
    left = remote.objects("checkpoint-2/")
    assert f"checkpoint-2/{WEIGHTS}" not in left  # the 48 MiB object was still in flight
    assert f"checkpoint-2/{MARKER_NAME}" not in left
    held = holder(ObjectStore(remote.url))
    assert held is not None and held[0] == dead and held[1] > time.time()  # within its TTL, but its process is gone
    options = {"lease_ttl_s": 10, "lease_wait_s": 0}
    with CheckpointManager(tmp_path / "b", remote=remote.url, storage_options=options) as mgr:  # takes it at once
        state = {"model": torch.nn.Linear(3072, 4096)}
        restored = mgr.restore(state)
    assert restored is not None and restored.step == 1
    assert remote.objects("checkpoint-2/") == {}  # the uncommitted upload was removed by the new writer
    opened = [e for e in read_events(tmp_path / "b") if e["event"] == "remote_preflight"]
    assert opened[-1]["removed"] == ["checkpoint-2"]


def test_server_killed_mid_upload_is_typed_keeps_the_local_checkpoint_and_is_raised_once_the_next_save_stands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = S3Server(upload_bytes_per_s=2 << 20)  # its own: this test kills it, mid-upload (about 5 s each)
    try:
        use_server(monkeypatch, server)
        remote = new_run(server)
        options = {"connect_timeout": 1, "read_timeout": 5, "max_attempts": 1, "chunk_bytes": 5 << 20}
        mgr = CheckpointManager(tmp_path / "run", remote=remote.url, storage_options=options)
        state = {"model": torch.nn.Linear(3072, 4096)}
        mgr.save(1, state)
        mgr.save(2, state)
        wait_for(lambda: remote.objects("checkpoint-2/"), "the first object of upload 2")
    finally:
        server.stop()
    wait_for(
        lambda: any(e["event"] == "upload_failed" for e in read_events(tmp_path / "run")), "upload_failed logged"
    )  # logged at once, before any later call
    failed = next(e for e in read_events(tmp_path / "run") if e["event"] == "upload_failed")
    assert failed["step"] == 2 and failed["error"] == "UploadError"
    assert "cannot be reached" in failed["message"] or "Connection" in failed["message"], failed["message"]
    assert verify_checkpoint(tmp_path / "run" / "checkpoint-2", "full").ok  # the local checkpoint is intact
    with pytest.raises(UploadError, match="checkpoint-2") as raised:
        mgr.save(3, state)
    assert "local checkpoint is intact" in raised.value.remedy
    assert verify_checkpoint(tmp_path / "run" / "checkpoint-3", "full").ok  # raised once save 3 stood locally
    assert [r.step for r in mgr.results] == [1, 2, 3]
    with pytest.raises(UploadError, match="checkpoint-3"):  # its own upload failed too: raised at close, once
        mgr.close()
    with CheckpointManager(tmp_path / "run") as after:  # a caller who handled UploadError lost no save
        assert after.latest().step == 3
    from ckptguard.report.collect import collect

    failures = [m.text for m in collect(tmp_path / "run").history.marks if m.kind == "failure"]
    assert any(t.startswith("upload of checkpoint-2 failed: UploadError") for t in failures), failures


def test_failed_upload_is_raised_at_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = S3Server()
    use_server(monkeypatch, server)
    remote = new_run(server)
    mgr = CheckpointManager(
        tmp_path / "run", remote=remote.url, storage_options={"connect_timeout": 1, "max_attempts": 1}
    )
    server.stop()
    mgr.save(1, make_training_state())
    with pytest.raises(UploadError, match="could not upload checkpoint-1"):
        mgr.close()
    assert verify_checkpoint(tmp_path / "run" / "checkpoint-1", "full").ok


def test_fresh_machine_resumes_from_the_newest_remote_checkpoint(tmp_path: Path, remote: RemoteRun) -> None:
    state = make_training_state(seed=3)
    with CheckpointManager(tmp_path / "a", remote=remote.url) as mgr:
        mgr.save(5, state)
        mgr.save(7, state)
    fresh = make_training_state(seed=4)
    with CheckpointManager(tmp_path / "b", remote=remote.url) as mgr:
        restored = mgr.restore(fresh)
        assert restored is not None and restored.step == 7
        mgr.save(8, fresh)  # the run goes on: sequence after the downloaded one
    for a, b in zip(state["model"].parameters(), fresh["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert verify_checkpoint(tmp_path / "b" / "checkpoint-7", "full").ok
    downloaded = [e for e in read_events(tmp_path / "b") if e["event"] == "download"]
    assert [e["step"] for e in downloaded] == [7]
    with CheckpointManager(tmp_path / "c", remote=remote.url) as mgr:
        latest = mgr.restore(make_training_state(seed=5))
    assert latest is not None and latest.step == 8


def test_async_saves_are_uploaded_after_their_background_commit(tmp_path: Path, remote: RemoteRun) -> None:
    state = make_training_state()
    with CheckpointManager(tmp_path / "run", remote=remote.url, async_save=True) as mgr:
        assert mgr.save(1, state) is None and mgr.save(2, state) is None  # both return before writing
    committed = sorted(k.split("/")[0] for k in remote.objects() if k.endswith(f"/{MARKER_NAME}"))
    assert committed == ["checkpoint-1", "checkpoint-2"]
    uploads = [e["step"] for e in read_events(tmp_path / "run") if e["event"] == "upload"]
    assert uploads == [1, 2]


def test_a_url_run_keeps_its_local_tier_in_the_cache_and_a_fresh_machine_resumes_from_the_bucket(
    tmp_path: Path, remote: RemoteRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPTGUARD_CACHE", str(tmp_path / "cache"))
    state = make_training_state(seed=1)
    with CheckpointManager(remote.url, keep_last=1) as mgr:
        mgr.save(1, state)
        result = mgr.save(2, state)
    endpoint = remote.server.endpoint.removeprefix("http://")  # the same bucket elsewhere is another run
    local = tmp_path / "cache" / endpoint / remote.bucket / "exp" / "run"
    assert mgr.run_dir == local and result is not None and result.path == local / "checkpoint-2"
    assert sorted(p.name for p in local.glob("checkpoint-*")) == ["checkpoint-2"]  # keep_last: the local tier
    committed = sorted(k.split("/")[0] for k in remote.objects() if k.endswith(f"/{MARKER_NAME}"))
    assert committed == ["checkpoint-1", "checkpoint-2"]  # remote_keep_last None: the bucket keeps every one
    fresh = make_training_state(seed=2)
    with CheckpointManager(remote.url, storage_options={"local_dir": str(tmp_path / "empty")}) as mgr:
        restored = mgr.restore(fresh)
    assert restored is not None and restored.step == 2 and restored.path == tmp_path / "empty" / "checkpoint-2"
    for a, b in zip(state["model"].parameters(), fresh["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    with CheckpointManager(tmp_path / "other", remote=remote.url) as mgr:  # the remote= form: the same run
        assert mgr.restore(make_training_state(seed=3)).step == 2  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("run_dir", "kwargs", "message"),
    [
        ("s3://bucket/run", {"remote": "s3://bucket/run"}, "is a URL already"),
        ("local", {"remote": "s3://bucket/run", "storage_options": {"local_dir": "x"}}, "two local directories"),
        ("local", {"storage_options": {"mode": "direct"}}, "apply to s3:// runs only"),
        ("s3://bucket/run", {"storage_options": {"mode": "fast"}}, r"must be one of \('tiered', 'direct'\)"),
        ("s3://bucket/run", {"storage_options": {"mode": "direct"}, "remote_keep_last": 2},
         "keep_last is the bucket's"),
        ("local", {"remote": "gs://bucket/run"}, "not an s3:// URL"),
        ("local", {"remote": "s3://bucket/run", "storage_options": {"endpoint": "x"}}, r"unknown storage_options"),
    ],
)  # fmt: skip
def test_a_bad_remote_location_is_a_value_error_before_anything_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_dir: str, kwargs: dict[str, Any], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CKPTGUARD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=message):
        CheckpointManager(run_dir, **kwargs)
    assert list(tmp_path.iterdir()) == []


TINY = ["model.hidden_size=32", "model.intermediate_size=64", "data.seq_len=32", "train.batch_size=4"]
TINY += ["train.eval_every=10", "train.eval_batches=2", "train.progress_bar=false", "checkpoint.save_every=5"]


def train(*overrides: str, flags: tuple[str, ...] = ()) -> int:
    from ckptguard.cli.main import main

    return main(["train", *[a for kv in [*TINY, *overrides] for a in ("--set", kv)], *flags])


def test_trainer_uploads_to_checkpoint_remote_and_a_fresh_output_dir_resumes_from_it(
    tmp_path: Path, remote: RemoteRun, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = [f"checkpoint.remote={remote.url}", "checkpoint.remote_keep_last=1"]
    assert train(*bucket, f"checkpoint.output_dir={tmp_path / 'first'}", "train.max_steps=10") == 0  # saves 5, 10
    committed = sorted(k.split("/")[0] for k in remote.objects() if k.endswith(f"/{MARKER_NAME}"))
    assert committed == ["checkpoint-10"]  # remote retention: the newest one only
    capsys.readouterr()
    # an empty output_dir: the run continues from the bucket
    assert train(*bucket, f"checkpoint.output_dir={tmp_path / 'second'}", "train.max_steps=12") == 0
    assert "resumed from" in capsys.readouterr().out and (tmp_path / "second" / "checkpoint-10").is_dir()


def test_resume_none_on_an_empty_machine_is_refused_over_the_buckets_checkpoints(
    tmp_path: Path, remote: RemoteRun, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh start would supersede the bucket's checkpoints one by one: it must be meant, as it is locally."""
    out = [f"checkpoint.output_dir={remote.url}", "train.max_steps=5"]
    assert train(*out, f"checkpoint.local_dir={tmp_path / 'a'}") == 0
    before = remote.read("checkpoint-5/MANIFEST.json")
    capsys.readouterr()
    assert train(*out, f"checkpoint.local_dir={tmp_path / 'b'}", flags=("--resume", "none")) == 2
    err = capsys.readouterr().err
    assert f"checkpoint.output_dir {remote.url} already holds 1 valid checkpoint(s) of a run: checkpoint-5" in err
    assert remote.read("checkpoint-5/MANIFEST.json") == before  # untouched
    assert train(*out, f"checkpoint.local_dir={tmp_path / 'c'}", flags=("--resume", "none", "--new-timeline")) == 0
    assert "--new-timeline: starting a new run at step 0 among them" in capsys.readouterr().err


def test_trainer_on_an_s3_output_dir_direct_then_tiered_and_export_from_the_bucket(
    tmp_path: Path, remote: RemoteRun, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    from ckptguard.cli.main import main

    out = [f"checkpoint.output_dir={remote.url}", "checkpoint.keep_last=1", "checkpoint.keep_best=0"]
    direct = ["checkpoint.remote_mode=direct", "train.max_steps=10"]
    assert train(*out, *direct, f"checkpoint.local_dir={tmp_path / 'a'}") == 0
    committed = sorted(k.split("/")[0] for k in remote.objects() if k.endswith(f"/{MARKER_NAME}"))
    assert committed == ["checkpoint-10"] and not list((tmp_path / "a").glob("checkpoint-*"))
    # tiered, its local tier in the cache: resumes from the bucket, saves 15 locally and uploads it
    assert train(*out, "train.max_steps=15") == 0
    assert f"resumed from {os.environ['CKPTGUARD_CACHE']}" in capsys.readouterr().out
    assert "checkpoint-15/COMMITTED" in remote.objects()

    assert main(["export", remote.url, "--out", str(tmp_path / "adapter")]) == 0  # the newest: 15
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    (tmp_path / "raw.safetensors").write_bytes(remote.read("checkpoint-15/adapter_model.safetensors"))
    saved = load_file(tmp_path / "raw.safetensors")
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    data = bytearray(remote.read("checkpoint-15/adapter_model.safetensors"))
    data[-1] ^= 0xFF  # same size: only the hash on download can tell
    remote.tamper("checkpoint-15/adapter_model.safetensors", bytes(data))
    capsys.readouterr()
    assert main(["export", f"{remote.url}/checkpoint-15", "--out", str(tmp_path / "never")]) == 1
    assert "CorruptCheckpointError" in capsys.readouterr().err and not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["checkpoint.output_dir=s3://b/run", "checkpoint.remote=s3://b/run"], "is an s3:// URL already"),
        (["checkpoint.local_dir=/tmp/x"], "applies to an s3:// checkpoint.output_dir"),
        (["checkpoint.output_dir=s3://b/r", "checkpoint.remote_mode=direct", "checkpoint.remote_keep_last=2"],
         "in direct mode checkpoint.keep_last is the bucket's retention"),
        (["checkpoint.remote_mode=fast"], "expected one of 'tiered', 'direct'"),
        (["checkpoint.output_dir=s3://b/r", "checkpoint.remote_mode=direct", "train.strategy=fsdp"],
         "cannot hold FSDP shards"),
    ],
)  # fmt: skip
def test_remote_settings_that_contradict_each_other_are_config_errors(
    overrides: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(*overrides) == 2
    assert message in capsys.readouterr().err


def test_trainer_on_a_missing_bucket_fails_before_step_1_naming_it(
    remote: RemoteRun, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train("checkpoint.output_dir=s3://no-such-bucket-here/run", "train.max_steps=5") == 1
    out, err = capsys.readouterr()
    assert "BucketNotFoundError" in err and "'no-such-bucket-here' does not exist" in err
    assert "step 1/" not in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("checkpoint.output_dir=s3://../x",
         "checkpoint.output_dir: 's3://../x' is not a valid s3:// URL: the bucket name '..' does not start"),
        ("checkpoint.remote=s3://bucket//run",
         "checkpoint.remote: 's3://bucket//run' is not a valid s3:// URL: the prefix has an empty part"),
    ],
)  # fmt: skip
def test_trainer_with_a_bad_url_in_its_config_is_a_config_error_and_creates_nothing(
    override: str, message: str, tmp_path: Path, remote: RemoteRun, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """s3://../x would put the local tier beside the endpoint's folder of the cache: refused before any file."""
    (tmp_path / "home" / "cache").mkdir(parents=True)
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("CKPTGUARD_CACHE", str(tmp_path / "home" / "cache"))
    monkeypatch.chdir(tmp_path / "cwd")
    assert train(override, "train.max_steps=5") == 2
    out, err = capsys.readouterr()
    assert f"error: {message}" in err and "step 1/" not in out
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["cwd", "home", "home/cache"]
