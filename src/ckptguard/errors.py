"""Typed exceptions: every checkpoint failure says what, where, at which step, why, and what to do.

A user who sees one of these in a log at 3 a.m. must not need the source code: the message
carries the path, the step, the OS error name where there is one, and a one-line remedy.
Distributed runs rebuild the same exception on every rank from a small JSON-able summary
(:meth:`CheckpointError.summary` / :func:`from_summary`): only plain fields cross the process
boundary, never an exception object or its traceback.
"""

from __future__ import annotations

import errno as errno_module
import os
from typing import Any


class CheckpointError(Exception):
    """Base class: a checkpoint could not be written, read, verified or trusted."""

    default_remedy = "See the message above; earlier checkpoints are untouched."

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        step: int | None = None,
        errno: int | None = None,
        remedy: str | None = None,
        rank: int | None = None,
    ) -> None:
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.step = step
        self.errno = errno
        self.remedy = remedy or self.default_remedy
        self.rank = rank
        super().__init__(self.__str__())
        self.errno = errno  # again: an error that is also an OSError (MissingPathError) has it reset by OSError's init

    def __str__(self) -> str:
        facts = []
        if self.path is not None:
            facts.append(f"path={self.path}")
        if self.step is not None:
            facts.append(f"step={self.step}")
        if self.errno is not None:
            facts.append(f"errno={errno_name(self.errno)}")
        if self.rank is not None:
            facts.append(f"rank={self.rank}")
        where = f" [{', '.join(facts)}]" if facts else ""
        return f"{self.message}{where}. Remedy: {self.remedy}"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the constructor's arguments: the default reduce calls ``cls(str(self))``, and the copy's
        args and repr then carry the remedy twice."""
        fields = {"path": self.path, "step": self.step, "errno": self.errno, "remedy": self.remedy, "rank": self.rank}
        return (_rebuild, (type(self), self.message, fields))

    def summary(self) -> dict[str, Any]:
        """A JSON-able description, enough to raise the same error on another rank."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "path": self.path,
            "step": self.step,
            "errno": self.errno,
            "remedy": self.remedy,
            "rank": self.rank,
        }


class PreflightError(CheckpointError):
    """The run directory cannot hold checkpoints; raised before the first training step."""

    default_remedy = "Fix the output directory before training starts; nothing was trained or written."


class NotWritableError(PreflightError):
    """A real write probe failed (permissions, read-only mount, path is a file, parent missing)."""

    default_remedy = "Choose another output directory or make this one writable (chmod/chown, remount rw)."


class InsufficientSpaceError(PreflightError):
    """Free bytes or inodes are below what retention will hold plus one save in flight."""

    default_remedy = "Free space, lower keep_last, or choose an output directory on a larger filesystem."


class LockedError(PreflightError):
    """Another process holds the run directory's lock."""

    default_remedy = "Stop the other run, or choose a different output directory."


class WriteError(CheckpointError):
    """Writing or committing a save failed; the staging directory was removed."""

    default_remedy = "Fix the cause above and save again; earlier checkpoints are intact."


class UnsupportedStateError(CheckpointError, ValueError):
    """The state cannot be saved as given (meta or sparse tensor, an object JSON cannot hold); nothing was written.

    Also a ValueError, as these were before they were typed: `except ValueError` keeps working.
    """

    default_remedy = "Change the named entry so it holds dense tensors and JSON-able values, then save again."


class InvalidURLError(CheckpointError, ValueError):
    """An s3:// URL that names no valid bucket and run prefix; refused before anything is created or contacted.

    Also a ValueError, as bad URLs were before they were typed: `except ValueError` keeps working.
    """

    default_remedy = "Write the location as s3://BUCKET/PREFIX, e.g. s3://my-bucket/runs/exp1."


class VerificationError(CheckpointError):
    """A just-written checkpoint does not match what was in memory."""

    default_remedy = "Do not trust this checkpoint; check the disk and memory (dmesg, SMART) and save again."


class CorruptCheckpointError(CheckpointError):
    """A checkpoint on disk is damaged, incomplete, hostile, or not a checkpoint at all."""

    default_remedy = "Resume from an earlier checkpoint (`ckptguard ls RUN_DIR` lists the valid ones)."


class CheckpointNotFoundError(CheckpointError):
    """No valid checkpoint matches the request."""

    default_remedy = "Run `ckptguard ls RUN_DIR` to see which checkpoints exist and why others are invalid."


class MissingPathError(CheckpointNotFoundError, FileNotFoundError):
    """The path given to load a checkpoint from does not exist (a typo, not damage).

    Also a FileNotFoundError, as the libraries' own loaders raise for it, so code that catches that goes
    on working with ckptguard in place."""

    default_remedy = "Check the path for a typo; `ckptguard ls RUN_DIR` lists the checkpoints there."


class CoordinationError(CheckpointError):
    """Ranks could not agree on a save (a rank died, hung, or the network failed)."""

    default_remedy = "Check the logs of every rank; a rank that died or hung stops the save on all ranks."


class RemoteError(CheckpointError):
    """Object storage refused or failed a request; local checkpoints are untouched."""

    default_remedy = "Check the endpoint, bucket and credentials (AWS_ENDPOINT_URL, AWS_PROFILE, ...) and try again."


class EndpointUnreachableError(RemoteError, PreflightError):
    """No connection to the object storage endpoint (wrong URL, server down, network)."""

    default_remedy = "Check AWS_ENDPOINT_URL (or storage_options['endpoint_url']) and that the server is up."


class BucketNotFoundError(RemoteError, PreflightError):
    """The bucket named in the s3:// URL does not exist."""

    default_remedy = "Create the bucket, or fix its name in the s3:// URL."


class RemoteAuthError(RemoteError, PreflightError):
    """Credentials are missing, unknown or not allowed to use the bucket."""

    default_remedy = "Set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE to credentials allowed on the bucket."


class UploadError(RemoteError):
    """A checkpoint could not be uploaded; it stays committed and verified on local disk."""

    default_remedy = "Fix the object storage problem; the local checkpoint is intact and the next save uploads again."


_TYPES: dict[str, type[CheckpointError]] = {
    cls.__name__: cls
    for cls in (
        CheckpointError,
        PreflightError,
        NotWritableError,
        InsufficientSpaceError,
        LockedError,
        WriteError,
        UnsupportedStateError,
        InvalidURLError,
        VerificationError,
        CorruptCheckpointError,
        CheckpointNotFoundError,
        MissingPathError,
        CoordinationError,
        RemoteError,
        EndpointUnreachableError,
        BucketNotFoundError,
        RemoteAuthError,
        UploadError,
    )
}


def _rebuild(cls: type[CheckpointError], message: str, fields: dict[str, Any]) -> CheckpointError:
    return cls(message, **fields)


def from_summary(summary: dict[str, Any]) -> CheckpointError:
    """Rebuild an error from :meth:`CheckpointError.summary`; unknown types become the base class."""
    cls = _TYPES.get(str(summary.get("type")), CheckpointError)
    return cls(
        str(summary.get("message", "unknown failure")),
        path=summary.get("path"),
        step=summary.get("step"),
        errno=summary.get("errno"),
        remedy=summary.get("remedy"),
        rank=summary.get("rank"),
    )


def errno_name(code: int) -> str:
    """`ENOSPC (No space left on device)` for 28; the bare number for unknown codes."""
    name = errno_module.errorcode.get(code)
    return f"{name} ({os.strerror(code)})" if name else str(code)


_OS_REMEDIES = {
    errno_module.ENOSPC: "The filesystem is full: free space, lower keep_last, or use a larger disk.",
    errno_module.EDQUOT: "Disk quota exceeded: free space under your quota or raise the quota.",
    errno_module.EROFS: "The filesystem is mounted read-only: remount it read-write or choose another path.",
    errno_module.EACCES: "Permission denied: chown/chmod the directory or choose another path.",
    errno_module.EPERM: "Operation not permitted: check ownership and mount options, or choose another path.",
    errno_module.EIO: "I/O error from the device: check dmesg and the disk's health before trusting it.",
    errno_module.ENOTDIR: "A path component is a file, not a directory: fix the path.",
    errno_module.ENOENT: "A directory in the path does not exist: create it or fix the path.",
    errno_module.EEXIST: "Something already exists at that path: remove it or choose another path.",
}


def remedy_for_errno(code: int | None, fallback: str) -> str:
    """The one-line remedy for an OS error code, or `fallback` when the code says nothing useful."""
    return _OS_REMEDIES.get(code, fallback) if code is not None else fallback


def from_os_error(
    cls: type[CheckpointError],
    what: str,
    exc: OSError,
    *,
    path: str | os.PathLike[str] | None = None,
    step: int | None = None,
) -> CheckpointError:
    """Wrap an OSError as `cls`, keeping the errno; `path` (the one the user knows) wins over the OS's."""
    reason = exc.strerror or str(exc)
    return cls(
        f"{what}: {reason}",
        path=path if path is not None else exc.filename,
        step=step,
        errno=exc.errno,
        remedy=remedy_for_errno(exc.errno, cls.default_remedy),
    )
