"""A checkpoint that is one file: a ``torch.save`` zip archive with ckptguard's manifest as one more record.

Lightning's ``.ckpt`` stays a file that ``torch.load`` and Lightning read unchanged. ``torch.save``
writes a zip archive whose records all sit under one prefix folder (``archive/data.pkl``,
``archive/data/0``, ...); the manifest goes in as the last record, inside that folder
(``archive/ckptguard/MANIFEST.json``), which ``torch.load`` ignores (a record outside the folder would
break it). The manifest lists every other record by name with the xxh3-128 of its bytes as stored:
its local header, its data and its data descriptor, from its offset to the next record's. Those spans
tile the file from byte 0 to the manifest record, so a flipped byte anywhere before the manifest
names the record that holds it; the manifest protects itself with its own checksum.

The archive is read as hostile input and never unpickled: Python's ``zipfile`` parses the central
directory, and nothing it says is trusted blindly. Every name must be a clean relative path under
the one prefix, unique; records must start at byte 0, follow each other without overlap, each long
enough for its header and data, the last ending where the central directory begins; the manifest
record, if there is one, comes last. Sizes and offsets past 4 GiB come from the zip64 records, which
``zipfile`` reads and writes.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from typing import BinaryIO

import xxhash

from ckptguard.format.layout import MANIFEST_RECORD
from ckptguard.format.manifest import (
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_FILES,
    FileEntry,
    ManifestError,
    check_relative_path,
)

WHOLE_FILE = "."  # the record a problem names when it is the archive as a whole
_LOCAL_HEADER = 30  # a zip local header's fixed part; its name follows
_CHUNK = 8 << 20
_UNREADABLE = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, struct.error, EOFError)


class ArchiveError(ManifestError):
    """The file is not an archive this format accepts; `record` names the record at fault (or WHOLE_FILE)."""

    def __init__(self, record: str, reason: str) -> None:
        super().__init__(reason)
        self.record = record


@dataclass(frozen=True)
class Record:
    """One record of the archive: its name and the bytes it spans, from its local header to the next record."""

    name: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Archive:
    """A validated index of a checkpoint file: the library's records in file order, and the manifest's."""

    prefix: str
    records: tuple[Record, ...]
    manifest: Record | None

    def sizes(self) -> dict[str, int]:
        """Record name -> spanned bytes, for comparing with a manifest's listing."""
        return {r.name: r.size for r in self.records}


def manifest_record_name(prefix: str) -> str:
    return f"{prefix}/{MANIFEST_RECORD}"


def read_archive(fh: BinaryIO) -> Archive:
    """Index the archive in `fh` (an open, seekable file); ArchiveError naming the first broken rule."""
    record = WHOLE_FILE
    try:
        with zipfile.ZipFile(fh) as zf:
            infos, start_dir = zf.infolist(), zf.start_dir
            for info in infos:  # zipfile compares each local header's name with the directory's
                record = info.filename[:200]
                zf.open(info).close()
    except _UNREADABLE as exc:
        what = "not a readable zip archive" if record == WHOLE_FILE else "has a damaged local header"
        raise ArchiveError(record, f"{what} ({str(exc)[:200]})") from None
    if not infos:
        raise ArchiveError(WHOLE_FILE, "the archive holds no records")
    if len(infos) > MAX_MANIFEST_FILES:
        raise ArchiveError(WHOLE_FILE, f"the archive holds {len(infos)} records, over the {MAX_MANIFEST_FILES} limit")
    prefix = _check_names(infos)
    records = _spans(sorted(infos, key=lambda i: i.header_offset), start_dir)
    manifest = next((r for r in records if r.name == manifest_record_name(prefix)), None)
    if manifest is not None and manifest is not records[-1]:
        raise ArchiveError(manifest.name, "the manifest record is not the last record (records were added after it)")
    return Archive(prefix, tuple(r for r in records if r is not manifest), manifest)


def _check_names(infos: list[zipfile.ZipInfo]) -> str:
    """The one prefix folder every record sits in (the first component of the first record's name)."""
    prefix = infos[0].filename.partition("/")[0]
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        try:
            check_relative_path(name)
        except ManifestError as exc:
            raise ArchiveError(name[:200], exc.reason) from None
        if name in seen:
            raise ArchiveError(name, "appears twice in the archive (a later copy would shadow the first)")
        if not name.startswith(f"{prefix}/"):
            raise ArchiveError(name, f"is outside the archive's folder {prefix}/ (torch.load would refuse it)")
        seen.add(name)
    return prefix


def _spans(ordered: list[zipfile.ZipInfo], start_dir: int) -> list[Record]:
    """Each record's span; they must tile the file from byte 0 to the central directory."""
    records = []
    for info, following in zip(ordered, [*ordered[1:], None], strict=True):
        end = following.header_offset if following is not None else start_dir
        start = info.header_offset
        if not records and start != 0:
            raise ArchiveError(info.filename, f"the first record starts at byte {start}, not 0 (bytes before it)")
        need = _LOCAL_HEADER + len(info.filename.encode("utf-8")) + info.compress_size
        if end - start < need:
            raise ArchiveError(info.filename, f"spans {end - start} bytes, less than its header and data ({need})")
        records.append(Record(info.filename, start, end))
    return records


def hash_span(fh: BinaryIO, start: int, end: int) -> str:
    """xxh3-128 of the bytes of `fh` from `start` to `end`; ArchiveError if the file ends first."""
    hasher = xxhash.xxh3_128()
    buf = bytearray(min(_CHUNK, max(end - start, 1)))
    view = memoryview(buf)
    fh.seek(start)
    left = end - start
    while left:
        got = fh.readinto(view[: min(left, len(buf))])
        if not got:
            raise ArchiveError(WHOLE_FILE, f"ends {left} bytes early")
        hasher.update(view[:got])
        left -= got
    return hasher.hexdigest()


def record_entries(fh: BinaryIO, archive: Archive) -> dict[str, FileEntry]:
    """Every library record of `archive` as a manifest entry: its span's size and xxh3-128."""
    return {r.name: FileEntry(size=r.size, xxh3_128=hash_span(fh, r.start, r.end)) for r in archive.records}


def read_manifest_bytes(fh: BinaryIO, archive: Archive) -> bytes:
    """The embedded manifest's bytes (zipfile checks their CRC); ArchiveError naming the record otherwise."""
    assert archive.manifest is not None
    name = archive.manifest.name
    try:
        with zipfile.ZipFile(fh) as zf:
            info = zf.getinfo(name)
            if info.file_size > MAX_MANIFEST_BYTES:
                raise ArchiveError(name, f"is over the {MAX_MANIFEST_BYTES >> 20} MiB limit for a manifest")
            return zf.read(info)
    except _UNREADABLE as exc:
        raise ArchiveError(name, f"cannot be read ({str(exc)[:200]})") from None


def append_manifest(fh: BinaryIO, archive: Archive, manifest: bytes) -> None:
    """Add `manifest` as the archive's last record (stored, uncompressed); the central directory is rewritten
    after it (with zip64 records where offsets pass 4 GiB), and the file truncated to its new end.

    `fh` is open for reading and writing; the caller fsyncs it."""
    if archive.manifest is not None:
        raise ArchiveError(archive.manifest.name, "the archive already holds a manifest")
    info = zipfile.ZipInfo(manifest_record_name(archive.prefix), date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    with zipfile.ZipFile(fh, mode="a", allowZip64=True) as zf:
        zf.writestr(info, manifest)
