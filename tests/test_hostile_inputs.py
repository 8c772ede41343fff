"""Hostile files: whatever a checkpoint directory holds, parsing either succeeds or raises our typed error.

Properties over arbitrary bytes and arbitrary JSON (hypothesis), for the manifest parser, the
state-tree decoder and discovery, plus the crafted cases that once took a whole run down (JSON
nested very deep, integers too large for a float). ``make fuzz`` runs the same properties longer
(HYPOTHESIS_PROFILE=long).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptguard import CheckpointManager
from ckptguard.catalog.discovery import discover
from ckptguard.format import tree
from ckptguard.format.manifest import FORMAT, FORMAT_VERSION, ManifestError, _checksum, parse_manifest
from conftest import make_training_state

settings.register_profile("default", max_examples=150, deadline=None)
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_big_ints = st.one_of(st.integers(), st.integers(min_value=2**63 - 2, max_value=2**70), st.just(10**4000))
json_values = st.recursive(
    st.none() | st.booleans() | _big_ints | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
_file_entries = st.dictionaries(
    st.text(max_size=12),
    st.fixed_dictionaries({"size": _big_ints, "xxh3_128": st.just("0" * 32) | st.text(max_size=4)}) | json_values,
    max_size=3,
)
manifest_bodies = st.fixed_dictionaries(
    {"format": st.just(FORMAT), "format_version": st.just(FORMAT_VERSION)},
    optional={
        "step": json_values | _big_ints,
        "sequence": _big_ints | json_values,
        "created": st.floats(allow_nan=False) | _big_ints,
        "world_size": _big_ints,
        "files": _file_entries,
        "metrics": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        "versions": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    },
)


def signed(body: dict) -> bytes:
    """A manifest a hostile writer made self-consistent: its own checksum passes."""
    body = dict(body)
    body["checksum"] = _checksum(body)
    return json.dumps(body).encode()


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@given(st.binary(max_size=512))
def test_arbitrary_bytes_parse_or_raise_manifest_error(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(data)


@given(manifest_bodies)
def test_arbitrary_self_consistent_manifests_parse_or_raise_manifest_error(body: dict) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(signed(body))


@given(json_values)
def test_arbitrary_trees_decode_or_raise_tree_error(value: object) -> None:
    tensors = {"t": torch.zeros(2, dtype=torch.bfloat16)}
    for candidate in (value, {"__tensor__": value}, {"__dict__": value}, {"__ndarray__": "t"}, {"__tuple__": value}):
        with contextlib.suppress(tree.TreeError):
            tree.decode(candidate, tensors)


@pytest.mark.parametrize(
    "field, value",
    [
        ("files", {"state/x": {"size": 10**400, "xxh3_128": "0" * 32}}),
        ("metrics", {"loss": 10**400}),
        ("created", 10**400),
        ("sequence", 2**64),
        ("step", -1),
        ("world_size", 0),
    ],
)
def test_values_beyond_their_range_are_a_manifest_error(field: str, value: object) -> None:
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": 1,
        "sequence": 1,
        "created": 1.0,
        "world_size": 1,
        "files": {"state/x": {"size": 1, "xxh3_128": "0" * 32}},
        "metrics": {},
        "versions": {},
        field: value,
    }
    with pytest.raises(ManifestError):
        parse_manifest(signed(body))


@pytest.mark.parametrize(
    "raw",
    [
        deep(100_000).encode(),  # RecursionError inside the JSON parser
        ('{"format": ' + deep(500) + "}").encode(),  # parses, but nests far deeper than any state
        b'{"step": ' + b"9" * 5000 + b"}",  # more digits than Python converts
        b'{"created": 1e400}',  # parses as infinity
    ],
)
def test_crafted_json_is_a_manifest_error(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(raw)


def test_one_hostile_checkpoint_never_takes_down_discovery_or_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as mgr:
        mgr.save(1, make_training_state())
    hostile = {
        "checkpoint-2": deep(100_000).encode(),
        "checkpoint-3": b'{"format": "ckptguard-checkpoint", "step": 3, "files": 1' + b"0" * 5000 + b"}",
        "checkpoint-4": signed(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "step": 4,
                "sequence": 10**30,
                "created": 1.0,
                "world_size": 1,
                "files": {"a": {"size": 1, "xxh3_128": "0" * 32}},
                "metrics": {"loss": 10**400},
                "versions": {},
            }
        ),
    }
    for name, data in hostile.items():
        (run / name).mkdir()
        (run / name / "MANIFEST.json").write_bytes(data)
    found = {c.name: c for c in discover(run)}
    assert found["checkpoint-1"].valid and not any(found[n].valid for n in hostile)
    with CheckpointManager(run) as mgr:  # the constructor discovers too
        assert mgr.restore(make_training_state(seed=1)).step == 1


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest_bodies)
def test_discovery_survives_any_self_consistent_manifest(tmp_path: Path, body: dict) -> None:
    ckpt = tmp_path / "run" / "checkpoint-5"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "MANIFEST.json").write_bytes(signed(body))
    for info in discover(tmp_path / "run"):
        assert isinstance(info.valid, bool)
