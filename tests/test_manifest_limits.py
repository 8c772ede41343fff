"""A manifest is bounded before it costs anything: files listed, bytes, name components, file/dir aliasing.

Each crafted manifest is correctly signed, so only these bounds stop it; a refused one is an invalid
checkpoint that resume skips for the previous one, with the limit named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ckptguard import CheckpointManager
from ckptguard.catalog.verify import verify_checkpoint
from ckptguard.format.manifest import (
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_FILES,
    MAX_NAME_BYTES,
    ManifestError,
    _checksum,
    check_relative_path,
    parse_manifest,
)
from conftest import make_training_state

_ENTRY = {"size": 1, "xxh3_128": "0" * 32, "tensors": 0}


def _signed(body: dict[str, Any], indent: int | None = None) -> bytes:
    return json.dumps({**body, "checksum": _checksum(body)}, indent=indent).encode()


def _two_saves(run: Path) -> dict[str, Any]:
    state = make_training_state()
    with CheckpointManager(run) as mgr:
        mgr.save(1, state)
        mgr.save(2, state)
    return json.loads((run / "checkpoint-2" / "MANIFEST.json").read_bytes())


@pytest.mark.parametrize(
    ("extra", "indent", "reason"),
    [
        ({f"x/{i:06d}": _ENTRY for i in range(MAX_MANIFEST_FILES + 1)}, None, "file limit"),
        ({f"x/{i:07d}-{'p' * 200}": _ENTRY for i in range(40_000)}, 2, f"over the {MAX_MANIFEST_BYTES >> 20} MiB"),
        ({"x/" + "a" * (MAX_NAME_BYTES + 45): _ENTRY}, None, "300-byte component (limit 255)"),
        ({"state/trainer_state.json/inner": _ENTRY}, None, "listed both as a file and as the directory"),
    ],
    ids=["32769-files", "over-8-MiB", "300-byte-component", "file-and-directory"],
)
def test_a_signed_manifest_over_a_bound_is_an_invalid_checkpoint_that_resume_skips(
    tmp_path: Path, extra: dict[str, Any], indent: int | None, reason: str
) -> None:
    run = tmp_path / "run"
    body = _two_saves(run)
    body.pop("checksum")
    body["files"] = {**body["files"], **extra}
    (run / "checkpoint-2" / "MANIFEST.json").write_bytes(_signed(body, indent))
    report = verify_checkpoint(run / "checkpoint-2", "quick")
    assert not report.ok and reason in (report.reason or ""), report.reason
    with CheckpointManager(run) as mgr:
        restored = mgr.restore(make_training_state(seed=1))
    assert restored is not None and restored.step == 1


@pytest.mark.parametrize(
    "path",
    ["a" * MAX_NAME_BYTES, "state/" + "é" * 127, "x/" + "b" * MAX_NAME_BYTES + "/y"],
    ids=["255-bytes", "254-utf8-bytes", "255-in-the-middle"],
)
def test_components_up_to_255_bytes_are_accepted(path: str) -> None:
    check_relative_path(path)


@pytest.mark.parametrize("path", ["a" * 256, "state/" + "é" * 128, "x/" + "b" * 256 + "/y"])
def test_a_component_over_255_bytes_is_refused_with_the_limit(path: str) -> None:
    with pytest.raises(ManifestError, match=r"-byte component \(limit 255\)"):
        check_relative_path(path)


def test_a_manifest_at_the_file_limit_parses(tmp_path: Path) -> None:
    body = _two_saves(tmp_path / "run")
    body.pop("checksum")
    body["files"] = {f"x/{i:06d}": _ENTRY for i in range(MAX_MANIFEST_FILES)}
    body["total_bytes"] = MAX_MANIFEST_FILES
    assert len(parse_manifest(_signed(body)).files) == MAX_MANIFEST_FILES
