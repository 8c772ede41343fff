"""DCP's ``.metadata`` is a pickle inside an untrusted checkpoint: it may rebuild DCP's records and nothing else.

Each hostile file here is forged into a committed checkpoint with its manifest re-signed, so every
hash verifies: what stops it is the decoding and the checks after it. A refused file makes the
checkpoint invalid (``verify`` names it; resume falls back to the previous one), it never runs code,
and it never makes the load read bytes from outside the checkpoint.
"""

from __future__ import annotations

import copy
import pickle
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from ckptguard import verify_checkpoint
from ckptguard.format import dcp_metadata
from ckptguard.format.manifest import Manifest, ManifestError, read_manifest
from faultkit import forge_file
from shardranks import resumed, run_ranks

METADATA = "sharded/.metadata"


def _call(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle that looks up module.name (STACK_GLOBAL, dotted names allowed) and calls it on arg."""

    def text(s: str) -> bytes:
        raw = s.encode()
        return b"\x8c" + bytes([len(raw)]) + raw

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."


@pytest.fixture
def real(fsdp_trained: tuple[Path, dict[str, str]]) -> tuple[bytes, Manifest, Any]:
    """The bytes of a real two-rank checkpoint's .metadata, its manifest, and the Metadata they decode to."""
    checkpoint = fsdp_trained[0] / "checkpoint-2"
    manifest = read_manifest(checkpoint)
    data = (checkpoint / METADATA).read_bytes()
    return data, manifest, dcp_metadata.parse(data, manifest)


def test_real_metadata_decodes_to_dcps_records(real: tuple[bytes, Manifest, Any]) -> None:
    _, _, metadata = real
    assert type(metadata).__name__ == "Metadata"
    assert {info.relative_path for info in metadata.storage_data.values()} == {"__0_0.distcp", "__1_0.distcp"}
    assert metadata.state_dict_metadata["model.0.weight"].size == (96, 16)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch.distributed.checkpoint.metadata", "torch.os.system"),  # reached attribute by attribute
        ("os", "system"),
        ("torch.serialization", "os.system"),
        ("builtins", "eval"),
    ],
)
def test_a_pickle_that_would_run_a_command_is_refused_and_runs_nothing(
    real: tuple[bytes, Manifest, Any], tmp_path: Path, module: str, name: str
) -> None:
    witness = tmp_path / "ran"
    with pytest.raises(ManifestError, match="is not part of DCP's metadata"):
        dcp_metadata.parse(_call(module, name, f"touch {witness}"), real[1])
    assert not witness.exists()


def test_state_set_on_a_class_is_refused(real: tuple[bytes, Manifest, Any]) -> None:
    """BUILD onto a class would change it for the whole process (setattr on torch.Size, say)."""
    module, name = b"torch.distributed.checkpoint.metadata", b"Metadata"
    data = (
        b"\x80\x04\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name + b"\x93"
        b"N}\x8c\x08__init__Ns\x86b."  # BUILD with (None, {"__init__": None}) slot state
    )
    with pytest.raises(ManifestError, match="sets the state of a type"):
        dcp_metadata.parse(data, real[1])
    from torch.distributed.checkpoint.metadata import Metadata

    assert Metadata.__init__ is not None


def test_persistent_ids_and_oversized_pickles_are_refused(real: tuple[bytes, Manifest, Any]) -> None:
    with pytest.raises(ManifestError, match="persistent object"):
        dcp_metadata.parse(b"\x80\x04\x8c\x01xQ.", real[1])
    huge = (
        b"\x80\x04\x8e" + struct.pack("<Q", dcp_metadata.MAX_METADATA_BYTES) + b"\0" * dcp_metadata.MAX_METADATA_BYTES
    )
    with pytest.raises(ManifestError, match="over the 64 MiB limit"):
        dcp_metadata.parse(huge, real[1])


@pytest.mark.parametrize(
    ("path", "offset", "why"),
    [
        ("/etc/passwd", 0, "is absolute"),
        ("../../checkpoint-1/sharded/__0_0.distcp", 0, "climbs out of the checkpoint"),
        ("__7_0.distcp", 0, "which the manifest does not list as a shard file"),
        (".metadata", 0, "which the manifest does not list as a shard file"),
        ("__0_0.distcp", 1 << 40, "lies outside __0_0.distcp"),
    ],
)
def test_every_storage_path_names_a_listed_shard_file_of_the_same_checkpoint(
    real: tuple[bytes, Manifest, Any], path: str, offset: int, why: str
) -> None:
    _, manifest, metadata = real
    hostile = copy.deepcopy(metadata)
    info = next(iter(hostile.storage_data.values()))
    info.relative_path, info.offset = path, offset
    with pytest.raises(ManifestError, match=why):
        dcp_metadata.parse(pickle.dumps(hostile, protocol=4), manifest)


def test_forged_metadata_that_would_run_code_makes_the_checkpoint_invalid_and_resume_takes_the_previous(
    fsdp_trained: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    run_dir, trace = fsdp_trained
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    witness = tmp_path / "ran"
    forge_file(
        copy_dir / "checkpoint-2",
        METADATA,
        _call("torch.distributed.checkpoint.metadata", "torch.os.system", f"touch {witness}"),
    )
    report = verify_checkpoint(copy_dir / "checkpoint-2", "full")
    assert not report.ok and report.reason is not None and report.reason.startswith(METADATA), report.reason
    assert "torch.os.system, which is not part of DCP's metadata" in report.reason
    report = resumed(copy_dir)
    assert (report["step"], report["restored"], report["next"]) == (1, trace["1"], trace["2"])
    assert not witness.exists()


def test_storage_path_into_another_checkpoint_is_refused_and_resume_takes_the_previous(
    fsdp_trained: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """checkpoint-2's index pointing at checkpoint-1's shards would load step 1's bytes as step 2, unverified."""
    run_dir, trace = fsdp_trained
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    checkpoint = copy_dir / "checkpoint-2"
    metadata = dcp_metadata.parse((checkpoint / METADATA).read_bytes(), read_manifest(checkpoint))
    for info in metadata.storage_data.values():
        info.relative_path = f"../../checkpoint-1/sharded/{info.relative_path}"
    forge_file(checkpoint, METADATA, pickle.dumps(metadata, protocol=4))
    assert "climbs out of the checkpoint" in (verify_checkpoint(checkpoint, "full").reason or "")
    report = resumed(copy_dir)
    assert (report["step"], report["restored"], report["next"]) == (1, trace["1"], trace["2"])


def test_restore_into_a_model_of_another_shape_raises_and_changes_nothing(
    fsdp_trained: tuple[Path, dict[str, str]],
) -> None:
    reports = run_ranks("mismatch", fsdp_trained[0])
    assert [r["type"] for r in reports] == ["CheckpointError", "CheckpointError"], reports
    assert all(r["unchanged"] for r in reports), reports  # no optimizer state built, no parameter touched
    assert "does not match the sharded state in the checkpoint (shape differs ['model.0.bias'" in reports[0]["text"]
