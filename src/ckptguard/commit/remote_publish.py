"""The commit protocol on object storage, which has no rename: a checkpoint is committed by a marker.

:class:`BucketCommitter` is its :class:`ckptguard.commit.base.Committer`: the data objects and then
MANIFEST.json sent create-only and hashed as sent, then ``COMMITTED`` written create-only, naming the
manifest's hash; each destructive step right after a lease renewal. The numbered comments (``# 1.``
to ``# 5.``) are the steps of "The bucket commit by marker" in docs/protocol.md, which describes them
with what makes a bucket checkpoint exist. Reading a bucket (discover, verify, download) is here too;
a download commits locally through :func:`ckptguard.commit.publish.publish`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from ckptguard.catalog.checkpoint import Checkpoint
from ckptguard.catalog.verify import Problem, VerifyReport, check_listing, hash_mismatch, size_mismatch
from ckptguard.commit import publish
from ckptguard.commit.base import DeepCheck, Published
from ckptguard.errors import (
    CheckpointError,
    CorruptCheckpointError,
    LockedError,
    RemoteError,
    UploadError,
    VerificationError,
    WriteError,
    from_os_error,
)
from ckptguard.files import writer
from ckptguard.files.events import EventLog
from ckptguard.files.writer import FilePlan
from ckptguard.format.layout import MANIFEST_NAME, MARKER_NAME, step_from_name
from ckptguard.format.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, ManifestError, parse_manifest
from ckptguard.format.marker import MAX_MARKER_BYTES, marker_bytes, parse_marker
from ckptguard.s3.objectstore import ObjectStore, PreconditionFailed

_PARALLEL_FILES = 4


@dataclass(frozen=True, kw_only=True)
class RemoteCheckpoint(Checkpoint):
    """One ``checkpoint-{step}/`` prefix in a bucket as discovery sees it, with its manifest (to download it)."""

    url: str
    manifest: Manifest | None = None


# ---- upload and commit ---------------------------------------------------------------------------


@dataclass
class BucketStaging:
    """The prefix of one save in a bucket while its objects are sent (nothing there is a checkpoint yet)."""

    committer: BucketCommitter
    name: str
    where: str

    def write(self, plans: Sequence[FilePlan]) -> dict[str, FileEntry]:
        """Step 3 for a save from memory: each planned file serialized straight into its object, hashed as sent."""
        files: dict[str, FileEntry] = {}
        by_path = {p.relpath: p for p in plans}

        def send(relpath: str) -> None:
            chunks, tensors = writer.file_chunks(by_path[relpath])
            size, digest = self.committer.store.upload_chunks(f"{self.name}/{relpath}", chunks)
            files[relpath] = FileEntry(size=size, xxh3_128=digest, tensors=tensors)

        with self.committer.translated(self.name):
            _each_file(send, {p.relpath: p.nbytes for p in plans})
        return files

    def send_files(self, source: Path, manifest: Manifest) -> None:
        """Step 3 for a committed local checkpoint: its files from `source`, each compared with `manifest` as sent."""
        store = self.committer.store

        def send(relpath: str) -> None:
            size, sent = store.upload_file(f"{self.name}/{relpath}", source / relpath)
            entry = manifest.files[relpath]
            if size != entry.size or sent != entry.xxh3_128:
                problem = size_mismatch(size, entry) if size != entry.size else hash_mismatch(sent, entry)
                raise UploadError(f"{relpath} changed on local disk while uploading: {problem}", path=source / relpath)

        with self.committer.translated(self.name):
            _each_file(send, {p: e.size for p, e in manifest.files.items()})


class BucketCommitter:
    """Checkpoints as prefixes of a bucket, committed by a marker (the steps of the module docstring).

    `fence` renews the run's lease (LockedError when it is lost) before every destructive step;
    `remedy` is what an UploadError of this committer tells the user to do.
    """

    def __init__(
        self,
        store: ObjectStore,
        fence: Callable[[], None],
        events: EventLog | None = None,
        *,
        remedy: str | None = None,
    ) -> None:
        self.store = store
        self.fence = fence
        self.events = events
        self.remedy = remedy

    def begin(self, name: str, *, same: Manifest | None = None) -> BucketStaging | None:
        """Steps 1-2: the lease renewed, whatever `name` holds deleted, the marker first. None when `same` is the
        manifest committed there already (a retry of an upload whose reply was lost)."""
        with self.translated(name):
            self.fence()  # 1.
            present = self.store.listing(f"{name}/")
            marker_key = f"{name}/{MARKER_NAME}"
            if marker_key in present:
                try:
                    marker = _read_marker(self.store, name)
                except ManifestError:  # not a marker this writer can read: un-commit it like any other
                    marker = "damaged"
                if same is not None and marker == xxhash.xxh3_128_hexdigest(same.to_json_bytes()):
                    return None
                if self.events is not None:
                    self.events.emit("remote_superseded", step=step_from_name(name), url=self.store.where(name))
            _delete_listed(self.store, name, present)  # 2.
        return BucketStaging(self, name, self.store.where(name))

    def publish(
        self,
        staging: BucketStaging,
        manifest: Manifest,
        *,
        level: str = "quick",
        deep: DeepCheck | None = None,
        reread: frozenset[str] = frozenset(),
        decoded: Mapping[str, Any] | None = None,
        latest: bool = True,
    ) -> Published:
        """Steps 3b-5 (MANIFEST.json, the lease renewed, the marker), then the bucket checked at `level` against
        what was sent; a bucket that does not hold it is un-committed again and raises VerificationError.
        Every byte was hashed as it was sent: `deep`, `reread`, `decoded` and `latest` have no bucket meaning."""
        name = staging.name
        with self.translated(name):
            manifest_bytes = manifest.to_json_bytes()
            self.store.put_bytes(f"{name}/{MANIFEST_NAME}", manifest_bytes)  # 3b.
            self.fence()  # 4.
            self.store.put_bytes(f"{name}/{MARKER_NAME}", marker_bytes(manifest, manifest_bytes))  # 5.
            report = verify(self.store, name, level)
        if not report.ok:
            with contextlib.suppress(Exception):
                remove(self.store, name, self.fence)
            raise VerificationError(f"the bucket does not hold what was sent: {report.reason}", path=report.path)
        return Published(self.store.where(name), manifest, report=report)

    def discard(self, staging: BucketStaging) -> None:
        """Nothing to do: objects without a marker are no checkpoint, and the next writer (holding the lease)
        removes them; deleting them now could hang on the very link that failed the save."""

    def remove(self, name: str) -> None:
        remove(self.store, name, self.fence)

    def where(self, name: str) -> str:
        return self.store.where(name)

    @contextmanager
    def translated(self, name: str) -> Iterator[None]:
        """Errors of `name`'s transfer as UploadError (a lost lease stays a LockedError with its remedy)."""
        try:
            yield
        except PreconditionFailed as exc:
            raise UploadError(
                f"another writer wrote {name} while this one uploaded; nothing it wrote was replaced or deleted",
                path=self.store.where(name),
                step=step_from_name(name),
                remedy="Two writers shared one remote run; stop one of them and check `ckptguard ls` on the URL.",
            ) from exc
        except Exception as exc:
            raise upload_error(exc, self.store.where(name), step_from_name(name), self.remedy) from exc


def upload(
    store: ObjectStore,
    source: Path,
    name: str,
    manifest: Manifest,
    *,
    fence: Callable[[], None],
    events: EventLog | None = None,
) -> int:
    """Upload the committed local checkpoint whose files are in `source` as `name`; returns bytes sent.

    Raises UploadError (with the RemoteError cause) or the lease's LockedError; nothing is committed then.
    """
    committer = BucketCommitter(store, fence, events)
    staging = committer.begin(name, same=manifest)
    if staging is None:
        return 0
    staging.send_files(source, manifest)
    committer.publish(staging, manifest)
    return manifest.total_bytes


DIRECT_REMEDY = (
    "Nothing of this save was committed and earlier checkpoints in the bucket are intact; "
    "fix the object storage problem and save again."
)


def upload_error(exc: Exception, where: str, step: int | None, remedy: str | None) -> CheckpointError:
    """`exc` as the UploadError of the save of `step` to `where`; a lost lease stays a LockedError with its remedy."""
    if isinstance(exc, (UploadError, LockedError)):
        error: CheckpointError = exc
    else:
        message = exc.message if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
        name = where.rstrip("/").rpartition("/")[2]
        error = UploadError(f"could not upload {name}: {message}", remedy=remedy)
    error.path, error.step = error.path or where, step
    return error


def _delete_listed(store: ObjectStore, name: str, present: dict[str, tuple[int, str]]) -> None:
    """Delete what a listing of `name` found, the marker first, each only if its ETag is still the listed one."""
    marker_key = f"{name}/{MARKER_NAME}"
    etags = {key: etag for key, (_, etag) in present.items()}
    if marker_key in etags:
        store.delete([marker_key], etags)
    store.delete(sorted(k for k in etags if k != marker_key), etags)


def _each_file(transfer: Callable[[str], None], sizes: dict[str, int]) -> None:
    """Run `transfer` on every file, largest first, a few at a time; the first error wins."""
    largest_first = sorted(sizes, key=lambda p: -sizes[p])
    with ThreadPoolExecutor(max_workers=_PARALLEL_FILES, thread_name_prefix="ckptguard-transfer") as pool:
        for done in [pool.submit(transfer, relpath) for relpath in largest_first]:
            done.result()


def _read_marker(store: ObjectStore, name: str) -> str | None:
    """The manifest digest a commit marker names; None if there is no marker; ManifestError if damaged."""
    try:
        data, _ = store.get_bytes(f"{name}/{MARKER_NAME}", MAX_MARKER_BYTES)
    except FileNotFoundError:
        return None
    return parse_marker(data)


# ---- discovery and verification --------------------------------------------------------------------


def _group(objects: dict[str, int]) -> dict[str, dict[str, int]]:
    """Objects of the run grouped by checkpoint name: name -> (path inside the checkpoint -> size)."""
    groups: dict[str, dict[str, int]] = {}
    for key, size in objects.items():
        head, sep, rest = key.partition("/")
        if sep and rest and step_from_name(head) is not None:
            groups.setdefault(head, {})[rest] = size
    return groups


def _quick(store: ObjectStore, name: str, present: dict[str, int], report: VerifyReport) -> None:
    """Marker, manifest and the listing agree: what `quick` verification means on object storage."""
    if MARKER_NAME not in present:
        report.problems.append(Problem(MARKER_NAME, "missing: the upload never committed"))
        return
    try:
        marker = _read_marker(store, name)
        data, _ = store.get_bytes(f"{name}/{MANIFEST_NAME}", MAX_MANIFEST_BYTES)
        if marker != xxhash.xxh3_128_hexdigest(data):
            raise ManifestError("MANIFEST.json is not the one the commit marker names (replaced after the commit)")
        report.manifest = manifest = parse_manifest(data)
    except FileNotFoundError:
        report.problems.append(Problem(MANIFEST_NAME, "missing: the upload never finished"))
        return
    except ManifestError as exc:
        report.problems.append(Problem(MANIFEST_NAME, exc.reason))
        return
    if manifest.step != step_from_name(name):
        report.problems.append(Problem(MANIFEST_NAME, f"manifest says step {manifest.step}, the name says {name}"))
    data_objects = {k: v for k, v in present.items() if k not in (MANIFEST_NAME, MARKER_NAME)}
    check_listing(report, manifest, data_objects, "object")


def discover(store: ObjectStore) -> list[RemoteCheckpoint]:
    """Every ``checkpoint-{step}/`` prefix in the run, quick-verified, in step order (one listing)."""
    found = []
    for name, present in sorted(_group(store.list()).items(), key=lambda kv: step_from_name(kv[0]) or 0):
        report = VerifyReport(store.where(name), "quick")
        _quick(store, name, present, report)
        found.append(
            RemoteCheckpoint(
                name=name, url=report.path, step=step_from_name(name) or 0, valid=report.ok, reason=report.reason,
                manifest=report.manifest, **Checkpoint.facts(report.manifest),
            )
        )  # fmt: skip
    return found


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def verify(store: ObjectStore, name: str, level: str = "full") -> VerifyReport:
    """Check one remote checkpoint: `quick` from the listing, `full` by downloading and hashing every object."""
    start = time.perf_counter()
    report = VerifyReport(store.where(name), level)
    _quick(store, name, _group(store.list(f"{name}/")).get(name, {}), report)
    if report.ok and level != "quick" and report.manifest is not None:
        for relpath, entry in sorted(report.manifest.files.items()):
            try:
                size, digest = store.download_file(f"{name}/{relpath}", _Discard())  # type: ignore[arg-type]
            except FileNotFoundError:  # listed a moment ago: deleted while this verify ran
                report.problems.append(Problem(relpath, "deleted while it was being verified (listed, then gone)"))
                continue
            report.bytes_read += size
            if size != entry.size:
                report.problems.append(Problem(relpath, size_mismatch(size, entry)))
            elif digest != entry.xxh3_128:
                report.problems.append(Problem(relpath, hash_mismatch(digest, entry)))
    report.seconds = time.perf_counter() - start
    return report


# ---- download, prune, clean ------------------------------------------------------------------------


def download(store: ObjectStore, checkpoint: RemoteCheckpoint, run_dir: Path, events: EventLog) -> Path:
    """Fetch a committed remote checkpoint into `run_dir` through the local publish path; returns its path.

    Every object is hashed as it arrives; a mismatch is a CorruptCheckpointError naming the object, and
    nothing is left behind locally.
    """
    manifest = checkpoint.manifest
    assert manifest is not None and checkpoint.valid
    local = publish.DirCommitter(run_dir, events)
    staging = local.begin(checkpoint.name)

    def fetch(relpath: str) -> None:
        entry = manifest.files[relpath]
        target = staging.where / relpath
        where = store.where(f"{checkpoint.name}/{relpath}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as fh:
                try:
                    size, digest = store.download_file(f"{checkpoint.name}/{relpath}", fh)
                except FileNotFoundError:
                    raise CorruptCheckpointError(f"{relpath} is listed in the manifest but gone", path=where) from None
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise from_os_error(WriteError, "could not write a downloaded file", exc, path=target) from exc
        if size != entry.size or digest != entry.xxh3_128:
            problem = size_mismatch(size, entry) if size != entry.size else hash_mismatch(digest, entry)
            raise CorruptCheckpointError(f"{relpath}: {problem}", path=where)

    try:
        _each_file(fetch, {p: e.size for p, e in manifest.files.items()})
        published = local.publish(staging, manifest, level="full")  # the bucket's own manifest, as committed
    except VerificationError as exc:  # every object arrived as listed, but what they hold disagrees
        raise CorruptCheckpointError(
            f"{checkpoint.name} arrived intact but is not a valid checkpoint: {exc.message}", path=checkpoint.url
        ) from exc
    except BaseException:
        local.discard(staging)
        raise
    return Path(published.where)


def remove(store: ObjectStore, name: str, fence: Callable[[], None]) -> None:
    """Delete a remote checkpoint, holding the lease: its marker first (it stops being a checkpoint), then the rest.

    An object that changed between the listing and its delete stays, and RemoteError says so.
    """
    fence()
    try:
        _delete_listed(store, name, store.listing(f"{name}/"))
    except PreconditionFailed as exc:
        raise RemoteError(
            f"{name}: an object changed while it was being removed, so it was left in place",
            path=str(exc),
            remedy="Another writer is using this run without its lease; stop it and check `ckptguard ls` on the URL.",
        ) from exc


def remove_uncommitted(store: ObjectStore, found: list[RemoteCheckpoint], fence: Callable[[], None]) -> list[str]:
    """Delete the objects of uploads that never committed (no marker), holding the lease."""
    removed = []
    for c in found:
        if c.reason is not None and c.reason.startswith(f"{MARKER_NAME}: missing"):
            remove(store, c.name, fence)
            removed.append(c.name)
    return removed
