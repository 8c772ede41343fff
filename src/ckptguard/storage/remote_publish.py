"""The commit protocol on object storage, which has no rename: a checkpoint is committed by a marker.

    upload (of a local checkpoint's files, or direct from memory):
             1. the lease is renewed: a writer that lost it stops here, having touched nothing
             2. whatever the name holds (an older commit of another timeline, an abandoned upload) is
                deleted, the marker first, each delete conditional on the ETag just listed
             3. every data object, create-only, hashed as it is sent (and compared with the local
                manifest, or recorded into the manifest of a direct save, whose bytes exist nowhere
                but in memory); then MANIFEST.json (the local manifest, byte for byte), create-only
             4. the lease is renewed again
             5. ``COMMITTED`` written create-only (``If-None-Match: *``), naming the manifest's xxh3-128
    prune:   the lease renewed, then the marker (so it stops being a checkpoint), then the data, each
             delete conditional on the ETag just listed

Every write is create-only and every delete conditional (objectstore), and each destructive step
runs right after a renewal that proves the lease is ours (lease): a writer that paused past its TTL
and resumed in the middle of any of these steps replaces or deletes nothing another writer wrote.

A checkpoint exists only if its marker is there, names the manifest that is there, and every object
the manifest lists is there with its size (``quick``) and hash (``full``). A killed upload leaves
objects without a marker: never listed as valid, never resumed from, removed by the next writer
(which holds the lease, so no other upload can be in progress). Newest is decided by the manifests'
save sequence, as on local disk. Downloads go through :func:`ckptguard.publish.publish`, so a
checkpoint fetched from a bucket is committed locally exactly like one saved there.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ckptguard import publish, writer
from ckptguard.discovery import Checkpoint
from ckptguard.errors import (
    CorruptCheckpointError,
    RemoteError,
    UploadError,
    VerificationError,
    WriteError,
    from_os_error,
)
from ckptguard.events import EventLog
from ckptguard.layout import MANIFEST_NAME, MARKER_NAME, step_from_name
from ckptguard.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, ManifestError, parse_json, parse_manifest
from ckptguard.snapshot import FilePlan
from ckptguard.storage.objectstore import ObjectStore, PreconditionFailed
from ckptguard.verify import Problem, VerifyReport, check_listing, hash_mismatch, size_mismatch

MARKER_FORMAT = "ckptguard-commit"
_MAX_MARKER_BYTES = 4096
_PARALLEL_FILES = 4


@dataclass(frozen=True, kw_only=True)
class RemoteCheckpoint(Checkpoint):
    """One ``checkpoint-{step}/`` prefix in a bucket as discovery sees it, with its manifest (to download it)."""

    url: str
    manifest: Manifest | None = None


# ---- upload and commit ---------------------------------------------------------------------------


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

    def send(relpath: str) -> None:
        size, sent = store.upload_file(f"{name}/{relpath}", source / relpath)
        entry = manifest.files[relpath]
        if size != entry.size or sent != entry.xxh3_128:
            problem = size_mismatch(size, entry) if size != entry.size else hash_mismatch(sent, entry)
            raise UploadError(f"{relpath} changed on local disk while uploading: {problem}", path=source / relpath)

    def send_all() -> Manifest:
        _each_file(send, {p: e.size for p, e in manifest.files.items()})
        return manifest

    done = commit(store, name, manifest.step, send_all, fence=fence, events=events, same=manifest)
    return done.total_bytes if done is not None else 0


def upload_from_memory(
    store: ObjectStore,
    name: str,
    step: int,
    plans: list[FilePlan],
    make_manifest: Callable[[dict[str, FileEntry]], Manifest],
    *,
    fence: Callable[[], None],
    events: EventLog | None = None,
) -> Manifest:
    """Direct-to-remote saving: each planned file serialized straight into its object, hashed as it is sent.

    No local file is written. The manifest is made from what was sent, then committed as :func:`upload` commits.
    """
    files: dict[str, FileEntry] = {}

    def send(relpath: str) -> None:
        plan = next(p for p in plans if p.relpath == relpath)
        chunks, tensors = writer.file_chunks(plan)
        size, digest = store.upload_chunks(f"{name}/{relpath}", chunks)
        files[relpath] = FileEntry(size=size, xxh3_128=digest, tensors=tensors)

    def send_all() -> Manifest:
        _each_file(send, {p.relpath: p.nbytes for p in plans})
        return make_manifest(files)

    done = commit(store, name, step, send_all, fence=fence, events=events)
    assert done is not None  # only a retry of the very same manifest can find itself committed
    return done


def commit(
    store: ObjectStore,
    name: str,
    step: int,
    send_all: Callable[[], Manifest],
    *,
    fence: Callable[[], None],
    events: EventLog | None,
    same: Manifest | None = None,
) -> Manifest | None:
    """Steps 1-5 of the module docstring around `send_all` (step 3's data, which returns the manifest to commit).

    `fence` renews the lease (LockedError when it is lost). Returns the committed manifest, or None
    when `same` was committed already (a retry after a lost reply).
    """
    fence()  # 1.
    present = store.listing(f"{name}/")
    marker_key = f"{name}/{MARKER_NAME}"
    if marker_key in present:
        try:
            marker = _read_marker(store, name)
        except ManifestError:  # not a marker this writer can read: un-commit it like any other (we hold the lease)
            marker = "damaged"
        if same is not None and marker == xxhash.xxh3_128_hexdigest(same.to_json_bytes()):
            return None
        if events is not None:
            events.emit("remote_superseded", step=step, url=store.where(name))
    try:
        _delete_listed(store, name, present)  # 2.
        manifest = send_all()  # 3.
        manifest_bytes = manifest.to_json_bytes()
        store.put_bytes(f"{name}/{MANIFEST_NAME}", manifest_bytes)
        fence()  # 4.
        body = {
            "format": MARKER_FORMAT, "manifest_xxh3_128": xxhash.xxh3_128_hexdigest(manifest_bytes),
            "step": manifest.step, "sequence": manifest.sequence,
        }  # fmt: skip
        store.put_bytes(marker_key, json.dumps(body, sort_keys=True).encode())  # 5.
    except PreconditionFailed as exc:
        raise UploadError(
            f"another writer wrote {name} while this one uploaded; nothing it wrote was replaced or deleted",
            path=store.where(name),
            step=step,
            remedy="Two writers shared one remote run; stop one of them and check `ckptguard ls` on the URL.",
        ) from exc
    return manifest


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
        data, _ = store.get_bytes(f"{name}/{MARKER_NAME}", _MAX_MARKER_BYTES)
    except FileNotFoundError:
        return None
    if len(data) > _MAX_MARKER_BYTES:
        raise ManifestError(f"{MARKER_NAME} is over {_MAX_MARKER_BYTES} bytes")
    body = parse_json(data, MARKER_NAME)
    digest = body.get("manifest_xxh3_128") if isinstance(body, dict) else None
    if not isinstance(body, dict) or body.get("format") != MARKER_FORMAT or not isinstance(digest, str):
        raise ManifestError(f"{MARKER_NAME} is not a ckptguard commit marker")
    return digest


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
    staging = publish.create_staging(run_dir, checkpoint.name)

    def fetch(relpath: str) -> None:
        entry = manifest.files[relpath]
        target = staging / relpath
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
        published = publish.publish(
            staging, run_dir / checkpoint.name, manifest, level="full", latest=True, events=events
        )
    except VerificationError as exc:  # every object arrived as listed, but what they hold disagrees
        raise CorruptCheckpointError(
            f"{checkpoint.name} arrived intact but is not a valid checkpoint: {exc.message}", path=checkpoint.url
        ) from exc
    except BaseException:
        publish.discard_staging(staging)
        raise
    return published.path


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
