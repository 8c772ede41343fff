"""The rules an ``s3://bucket/prefix`` URL follows before anything is touched: pure functions, names in, problems out.

A URL becomes object keys and also a local directory (the cache ``$CKPTGUARD_CACHE/<endpoint>/<bucket>/<prefix>``),
so a bucket must be one S3 itself would accept and every part of the prefix one a filesystem keeps as a single
directory: no ``.`` or ``..`` (``s3://../x`` must not write next to the cache), no empty parts (``s3://b//x`` is not
``s3://b/x`` to S3), at most 255 bytes (NAME_MAX), no control characters. Each function returns the rule a name
breaks, or None; :meth:`ckptguard.s3.objectstore.RemoteURL.parse` turns that into an error.
"""

from __future__ import annotations

import re
import unicodedata

BUCKET_MIN, BUCKET_MAX, PART_MAX_BYTES = 3, 63, 255
RESERVED_PREFIXES = ("xn--",)
RESERVED_SUFFIXES = ("-s3alias", "--ol-s3")
_BUCKET_CHARS = re.compile(r"[a-z0-9.-]*")
_IPV4_FORM = re.compile(r"\d{1,3}(\.\d{1,3}){3}")


def control_character(text: str) -> str | None:
    """The rule broken by the first control character (NUL, newline, DEL...) in `text`, or None."""
    for i, char in enumerate(text):
        if unicodedata.category(char) == "Cc":
            return f"it holds a control character ({char!r} at offset {i})"
    return None


def bucket_problem(bucket: str) -> str | None:
    """The S3 bucket-naming rule `bucket` breaks, or None for a name S3 accepts."""
    if not bucket:
        return "it names no bucket"
    if not _BUCKET_CHARS.fullmatch(bucket):
        bad = sorted({c for c in bucket if not _BUCKET_CHARS.fullmatch(c)})
        return (
            f"the bucket name {bucket!r} holds {', '.join(map(repr, bad))}; "
            "bucket names hold only lowercase letters, digits, dots and hyphens"
        )
    if not (bucket[0].isalnum() and bucket[-1].isalnum()):
        return f"the bucket name {bucket!r} does not start and end with a letter or a digit"
    if not BUCKET_MIN <= len(bucket) <= BUCKET_MAX:
        count = f"{len(bucket)} character{'s' if len(bucket) > 1 else ''}"
        return f"the bucket name {bucket!r} has {count}; bucket names have {BUCKET_MIN} to {BUCKET_MAX}"
    if ".." in bucket:
        return f"the bucket name {bucket!r} has two adjacent dots"
    if _IPV4_FORM.fullmatch(bucket):
        return f"the bucket name {bucket!r} is formatted as an IP address"
    for reserved in RESERVED_PREFIXES:
        if bucket.startswith(reserved):
            return f"the bucket name {bucket!r} starts with {reserved!r}, a prefix S3 reserves"
    for reserved in RESERVED_SUFFIXES:
        if bucket.endswith(reserved):
            return f"the bucket name {bucket!r} ends with {reserved!r}, a suffix S3 reserves for access point aliases"
    return None


def part_problem(part: str, what: str) -> str | None:
    """The rule broken by `part`, one directory name built from a URL (`what` names where it came from), or None."""
    if not part:
        return f"{what} has an empty part (two slashes in a row)"
    if part in (".", ".."):
        return f"{what} has a {part!r} part; no part may be '.' or '..'"
    size = len(part.encode("utf-8", "surrogatepass"))
    if size > PART_MAX_BYTES:
        return f"{what} has a part of {size} bytes in UTF-8 ({part[:24]!r}...); a part has at most {PART_MAX_BYTES}"
    problem = control_character(part)
    return f"{what}: {problem}" if problem else None


def prefix_problem(prefix: str) -> str | None:
    """The rule a run prefix (``runs/exp1``; "" for the top of the bucket) breaks, or None."""
    for part in prefix.split("/") if prefix else []:
        problem = part_problem(part, "the prefix")
        if problem is not None:
            return problem
    return None
