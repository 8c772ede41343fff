"""layout.py: a name is a checkpoint's only if the format made it, and every name parses back to what made it.

Discovery, retention, the bucket listing and the report all decide from these names which directories
are ours: a name the format never writes must never read as a step, or a user's copy would be
listed, ordered and pruned as a checkpoint.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptguard.format import layout
from ckptguard.format.layout import (
    checkpoint_name,
    entry_path,
    lightning_name,
    set_aside_kind,
    step_from_name,
)

settings.register_profile("default", max_examples=150, deadline=None)
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@given(st.integers(min_value=0, max_value=10**30))
def test_every_step_round_trips_through_its_name(step: int) -> None:
    assert step_from_name(checkpoint_name(step)) == step


@given(st.text(min_size=0, max_size=40))
def test_a_name_reads_as_a_step_only_if_it_is_exactly_the_name_of_that_step(name: str) -> None:
    step = step_from_name(name)
    assert step is None or checkpoint_name(step) == name


@pytest.mark.parametrize(
    "name",
    [
        "checkpoint-007",  # a hand-made copy of checkpoint-7: not the name step 7 gets
        "checkpoint-00",
        "checkpoint--1",
        "checkpoint-+1",
        "checkpoint- 1",
        "checkpoint-1 ",
        "checkpoint-5\n",  # `$` matches before a trailing newline
        "checkpoint-\u0663",  # ARABIC-INDIC DIGIT THREE: int() reads it as 3
        "checkpoint-\uff11",  # FULLWIDTH DIGIT ONE
        "checkpoint-1_000",
        "checkpoint-",
        "Checkpoint-1",
        "checkpoint_1",
        "checkpoint-1.superseded-20260101-abc",
        ".staging-checkpoint-1",
        "checkpoint-1/state",
    ],
)
def test_names_the_format_never_writes_are_not_checkpoints(name: str) -> None:
    assert step_from_name(name) is None


def test_step_0_and_a_name_as_long_as_a_filesystem_allows_are_checkpoints() -> None:
    assert step_from_name("checkpoint-0") == 0
    digits = "9" * (255 - len("checkpoint-"))  # NAME_MAX
    assert step_from_name("checkpoint-" + digits) == int(digits)


@pytest.mark.parametrize("kind", ["superseded", "corrupt", "unfinished"])
def test_a_set_aside_directory_names_its_checkpoint_and_kind(kind: str) -> None:
    assert set_aside_kind(f"checkpoint-12.{kind}-20261207T233000-1a2b") == ("checkpoint-12", kind)
    assert set_aside_kind(f"checkpoint_12.{kind}-20261207T233000-1a2b") == ("checkpoint_12", kind)  # Accelerate's


@pytest.mark.parametrize(
    "name",
    [
        "checkpoint-12",
        "checkpoint-12.superseded",  # no separator after the kind: not one we made
        "checkpoint-12.deleted-x",
        "checkpoint-012.corrupt-x",
        "checkpoint-\u0663.corrupt-x",
        "checkpoint_012.corrupt-x",
        "checkpoint_-1.superseded-x",
        ".staging-checkpoint-12.corrupt-x",
    ],
)
def test_other_names_are_not_set_aside(name: str) -> None:
    assert set_aside_kind(name) is None


def test_set_aside_names_are_made_from_a_checkpoint_name_and_the_marks_layout_names() -> None:
    assert layout.SUPERSEDED_MARK == ".superseded-"
    assert set_aside_kind(checkpoint_name(3) + layout.SUPERSEDED_MARK + "t-id") == ("checkpoint-3", "superseded")
    for kind in layout.QUARANTINE_KINDS:
        assert set_aside_kind(f"{checkpoint_name(3)}.{kind}-t-id") == ("checkpoint-3", kind)


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("epoch=0-step=100.ckpt", True),
        ("last.ckpt", True),
        ("last-v1.ckpt", True),
        ("\u00e9poque=1.ckpt", True),
        (".last.ckpt", False),  # hidden: a temporary of someone's
        ("last.ckpt.tmp", False),
        ("checkpoint-1", False),
    ],
)
def test_lightning_names_are_ckpt_files_that_are_not_hidden(name: str, ours: bool) -> None:
    assert lightning_name(name) is ours


def test_entries_go_under_state_and_per_rank_entries_under_their_rank() -> None:
    assert entry_path("model") == "state/model"
    assert entry_path("rng", rank=0) == "state/rank0/rng"
    assert entry_path("rng", rank=15) == "state/rank15/rng"
    assert layout.STATE_FILE == "state/trainer_state.json"


def test_the_names_users_and_other_tools_see_are_pinned() -> None:
    # a rename of any of these is a format change (docs/format.md), not a refactor
    assert (layout.MANIFEST_NAME, layout.LATEST_NAME, layout.MARKER_NAME) == ("MANIFEST.json", "LATEST", "COMMITTED")
    assert (layout.EVENTS_NAME, layout.LOCK_NAME, layout.LEASE_NAME) == (
        "events.jsonl",
        ".ckptguard.lock",
        ".ckptguard.lease",
    )
    assert layout.LATEST_TMP_PREFIX == ".LATEST.tmp-"
    assert layout.STAGING_PREFIX.startswith(".") and layout.TRASH_PREFIX.startswith(".")
    assert layout.VERIFY_LEVELS == ("quick", "full", "deep")
