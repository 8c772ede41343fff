"""errors.py: every typed error reads the same in a log, crosses ranks and processes whole, and maps real OS errors.

Other tests check which error a failure raises; these pin the formatting users grep for and the
rebuilding that distributed runs depend on.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from ckptguard import errors
from ckptguard.errors import (
    CheckpointError,
    CorruptCheckpointError,
    NotWritableError,
    UnsupportedStateError,
    WriteError,
    errno_name,
    from_os_error,
    from_summary,
    remedy_for_errno,
)

ALL_TYPES = [
    cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, CheckpointError)
]  # fmt: skip


def test_the_message_carries_path_step_errno_rank_and_remedy_in_one_line() -> None:
    err = WriteError("writing state/model.safetensors failed", path="/runs/a", step=7, errno=errno.ENOSPC, rank=1)
    assert str(err) == (
        "writing state/model.safetensors failed [path=/runs/a, step=7, errno=ENOSPC (No space left on device), "
        "rank=1]. Remedy: Fix the cause above and save again; earlier checkpoints are intact."
    )


def test_a_message_without_facts_has_no_empty_brackets_and_step_0_is_a_fact() -> None:
    assert str(CheckpointError("boom")) == f"boom. Remedy: {CheckpointError.default_remedy}"
    assert str(CheckpointError("boom", step=0, remedy="Do X.")) == "boom [step=0]. Remedy: Do X."


def test_a_path_like_is_kept_as_a_string() -> None:
    err = CorruptCheckpointError("bad", path=Path("/runs/a/checkpoint-3"))
    assert err.path == "/runs/a/checkpoint-3" and isinstance(err.path, str)
    json.dumps(err.summary())  # a Path would not cross ranks as JSON


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_every_type_has_its_own_remedy_and_an_explicit_one_wins(cls: type[CheckpointError]) -> None:
    assert cls("x").remedy == cls.default_remedy
    assert cls("x", remedy="Do this.").remedy == "Do this."
    if cls is not CheckpointError:
        assert cls.default_remedy != CheckpointError.default_remedy, f"{cls.__name__} says nothing of its own"


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_every_type_is_rebuilt_from_its_json_summary_as_the_same_type_and_text(cls: type[CheckpointError]) -> None:
    err = cls("the save failed", path="/r/checkpoint-2", step=2, errno=errno.EIO, remedy="Check dmesg.", rank=3)
    rebuilt = from_summary(json.loads(json.dumps(err.summary())))
    assert type(rebuilt) is cls
    assert rebuilt.summary() == err.summary()
    assert str(rebuilt) == str(err)


def test_an_unknown_or_missing_type_in_a_summary_becomes_the_base_class_keeping_the_fields() -> None:
    rebuilt = from_summary({"type": "NoSuchError", "message": "m", "path": "/p", "step": 4})
    assert type(rebuilt) is CheckpointError and (rebuilt.path, rebuilt.step) == ("/p", 4)
    assert str(from_summary({})) == f"unknown failure. Remedy: {CheckpointError.default_remedy}"


def test_typed_errors_that_were_value_errors_still_are() -> None:
    assert issubclass(UnsupportedStateError, ValueError)
    assert issubclass(errors.InvalidURLError, ValueError)
    assert issubclass(errors.EndpointUnreachableError, errors.PreflightError)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_a_pickled_error_is_the_same_error_in_text_fields_and_repr(cls: type[CheckpointError]) -> None:
    err = cls("copying failed", path="/r", step=5, errno=errno.EACCES, rank=0)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is cls and copy.summary() == err.summary()
    assert str(copy) == str(err)
    assert copy.args == err.args and repr(copy) == repr(err)  # repr is what `{exc!r}` and pytest's summaries show


_RAISE_IN_CHILD = """
import pickle, sys
from ckptguard.errors import NotWritableError
err = NotWritableError("cannot create files", path="/data/run1", step=9, errno=30, rank=2)
sys.stdout.buffer.write(pickle.dumps(err))
"""


def test_an_error_pickled_in_another_process_reads_the_same_here() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", _RAISE_IN_CHILD], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    err = pickle.loads(done.stdout)
    assert isinstance(err, NotWritableError)
    assert str(err) == (
        "cannot create files [path=/data/run1, step=9, errno=EROFS (Read-only file system), rank=2]. "
        f"Remedy: {NotWritableError.default_remedy}"
    )


def test_errno_names_read_as_the_symbol_and_its_text_and_unknown_codes_as_the_number() -> None:
    assert errno_name(errno.ENOSPC) == "ENOSPC (No space left on device)"
    assert errno_name(99999) == "99999"


def _real_os_error(action) -> OSError:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as raised:
        action()
    return raised.value


def test_a_real_enoent_keeps_its_errno_path_and_gets_the_missing_directory_remedy(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "file"
    exc = _real_os_error(missing.read_bytes)
    err = from_os_error(WriteError, "opening the file", exc, step=3)
    assert isinstance(err, WriteError)
    assert (err.errno, err.path, err.step) == (errno.ENOENT, str(missing), 3)
    assert err.message == "opening the file: No such file or directory"
    assert err.remedy == "A directory in the path does not exist: create it or fix the path."


def test_the_path_the_user_knows_wins_over_the_one_the_os_names(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    exc = _real_os_error(lambda: os.mkdir(tmp_path / "taken"))
    err = from_os_error(NotWritableError, "creating the run directory", exc, path="runs/exp1")
    assert err.path == "runs/exp1" and err.errno == errno.EEXIST
    assert err.remedy == "Something already exists at that path: remove it or choose another path."


def test_a_file_in_the_middle_of_a_path_is_enotdir_with_its_remedy(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    exc = _real_os_error(lambda: os.mkdir(tmp_path / "file" / "run"))
    err = from_os_error(NotWritableError, "creating", exc)
    assert err.errno == errno.ENOTDIR and err.remedy.startswith("A path component is a file")


def test_a_real_read_only_mount_maps_to_the_remount_remedy(tmp_path: Path) -> None:
    from faultkit import remount_read_only, tmpfs

    with tmpfs(tmp_path / "disk") as disk:
        remount_read_only(disk)
        exc = _real_os_error(lambda: (disk / "x").write_bytes(b"x"))
        err = from_os_error(NotWritableError, "probing", exc, path=disk)
    assert err.errno == errno.EROFS
    assert err.remedy == "The filesystem is mounted read-only: remount it read-write or choose another path."
    assert "errno=EROFS (Read-only file system)" in str(err)


def test_an_errno_that_says_nothing_useful_keeps_the_types_own_remedy() -> None:
    err = from_os_error(WriteError, "writing", OSError(errno.EAGAIN, "Resource temporarily unavailable"))
    assert err.remedy == WriteError.default_remedy and err.errno == errno.EAGAIN
    assert remedy_for_errno(None, "fallback") == "fallback"


def test_an_os_error_without_strerror_uses_its_text() -> None:
    err = from_os_error(WriteError, "writing", OSError("short write"))
    assert err.message == "writing: short write" and err.errno is None and err.path is None
