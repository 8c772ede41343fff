"""An S3-compatible bucket as ckptguard needs it: create-only and compare-and-swap writes, streamed
transfers hashed on the way, and every failure a typed :class:`~ckptguard.errors.RemoteError`.

Built on boto3 (the ``s3`` extra). Credentials, region and endpoint come from the standard places
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``~/.aws/config``, ``AWS_ENDPOINT_URL``...) unless
`storage_options` names them. Chosen over obstore and s3fs by measurement against the same server
(bench/objectstore.py): uploads ran at the same speed (the server is the limit), boto3 reads every
standard credential source including profiles, and s3transfer's in-order paths for unseekable
streams let every byte be hashed as it crosses the wire, in both directions, without a second read.

The server does not check our hashes for us (moto, for one, ignores client checksums), so the
xxh3-128 computed while transferring is compared with the manifest's before an object counts.

No write overwrites: every PutObject and CompleteMultipartUpload this store sends carries
``If-None-Match: *`` unless it is a compare-and-swap (``If-Match``), and a delete can be made
conditional on the ETags a listing returned. A writer that lost its lease can therefore replace
no byte another writer wrote, whatever it was doing when it paused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from ckptguard.errors import (
    BucketNotFoundError,
    EndpointUnreachableError,
    InvalidURLError,
    RemoteAuthError,
    RemoteError,
)
from ckptguard.s3 import locations

SCHEME = "s3://"
OPTIONS = {
    "endpoint_url": "the S3 endpoint, e.g. http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL or AWS)",
    "region_name": "region (default: AWS_DEFAULT_REGION or the profile's)",
    "profile": "a profile of ~/.aws/config",
    "key": "access key id",
    "secret": "secret access key",
    "token": "session token",
    "connect_timeout": "seconds to wait for a connection (default 10)",
    "read_timeout": "seconds to wait for a response (default 60)",
    "max_attempts": "tries per request, retries included (default 3)",
    "chunk_bytes": "multipart part size (default 16 MiB)",
    "max_concurrency": "parts in flight per object (default 8)",
    "lease_ttl_s": "seconds a writer's lease outlives its last renewal; a dead writer's run is free after it (300)",
    "lease_wait_s": "seconds a new writer waits for a lease it cannot prove dead to expire (default lease_ttl_s)",
    "mode": "'tiered' (default: save locally, upload in the background) or 'direct' (upload from memory)",
    "local_dir": "the local tier of a manager on a URL (default: $CKPTGUARD_CACHE/<endpoint>/<bucket>/<prefix>)",
}
_BUCKET_REMEDY = (
    "Give the bucket's name as S3 spells it: 3 to 63 lowercase letters, digits, dots and hyphens, starting and "
    "ending with a letter or a digit, e.g. s3://my-bucket.v2/runs/exp1."
)
_PREFIX_REMEDY = "Write the prefix as names joined by single slashes, none '.' or '..', e.g. s3://my-bucket/runs/exp1."
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "403"}


class PreconditionFailed(Exception):
    """A conditional write lost (HTTP 412): the object exists (create-only) or changed (If-Match)."""


@dataclass(frozen=True)
class RemoteURL:
    """``s3://bucket/prefix``: where a run's objects live."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> RemoteURL:
        """The bucket and prefix of `url`; InvalidURLError naming the rule it breaks (nothing is touched)."""
        if not is_remote(url):
            raise InvalidURLError(
                f"{url!r} is not an s3:// URL", path=url, remedy="Give an s3://BUCKET/PREFIX URL or a local directory."
            )
        bucket, _, prefix = url[len(SCHEME) :].partition("/")
        if len(prefix) > 1:  # s3://b/run/ is s3://b/run; s3://b/run// and s3://b// are not
            prefix = prefix.removesuffix("/")
        problem = locations.control_character(url)
        remedy = "Remove it from the URL (a stray newline or NUL from a script or a config file?)."
        if problem is None:
            problem, remedy = locations.bucket_problem(bucket), _BUCKET_REMEDY
        if problem is None:
            problem, remedy = locations.prefix_problem(prefix), _PREFIX_REMEDY
        if problem is not None:
            raise InvalidURLError(f"{url!r} is not a valid s3:// URL: {problem}", path=url, remedy=remedy)
        return cls(bucket, prefix)

    def key(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"


def is_remote(location: object) -> bool:
    return isinstance(location, str) and location.startswith(SCHEME)


def check_location(url: str, storage_options: Mapping[str, Any] | None) -> RemoteURL:
    """The parsed URL; InvalidURLError for a malformed one, ValueError for an unknown option (nothing touched)."""
    unknown = sorted(set(storage_options or {}) - set(OPTIONS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in OPTIONS.items())
        raise ValueError(f"unknown storage_options {unknown}; known: {known}")
    return RemoteURL.parse(url)


def _seconds(options: Mapping[str, Any], name: str, default: float, *, zero: bool) -> float:
    """A duration option as a finite float (> 0, or >= 0 where `zero`); ValueError naming it otherwise."""
    value = options.get(name, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"storage_options {name}={value!r}: expected a finite number of seconds {bound}")
    return float(value)


class _HashingReader:
    """A file as an unseekable stream that hashes what is read: s3transfer then reads it in order, once."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.hasher = xxhash.xxh3_128()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self.hasher.update(data)
        self.size += len(data)
        return data

    def seekable(self) -> bool:
        return False


class _ChunkReader:
    """Chunks of bytes (a file serialized in memory) as an unseekable stream, read in order once."""

    def __init__(self, chunks: Iterable[bytes | memoryview]) -> None:
        self._chunks = iter(chunks)
        self._head = memoryview(b"")

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if not self._head:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._head = memoryview(chunk).cast("B")
                continue
            take = len(self._head) if n < 0 else min(n - len(out), len(self._head))
            out += self._head[:take]
            self._head = self._head[take:]
        return bytes(out)

    def seekable(self) -> bool:
        return False


class _HashingWriter:
    """A file as an unseekable sink that hashes what is written: s3transfer then writes parts in order."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.hasher = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def seekable(self) -> bool:
        return False


class ObjectStore:
    """One bucket and prefix, through one boto3 client; every method raises RemoteError subclasses only."""

    def __init__(self, url: str | RemoteURL, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url if isinstance(url, RemoteURL) else check_location(url, storage_options)
        options = dict(storage_options or {})
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError as exc:
            raise RemoteError(
                "s3:// locations need boto3, which is not installed",
                path=str(self.url),
                remedy="pip install 'ckptguard[s3]'",
            ) from exc
        session = boto3.session.Session(
            profile_name=options.get("profile"),
            aws_access_key_id=options.get("key"),
            aws_secret_access_key=options.get("secret"),
            aws_session_token=options.get("token"),
            region_name=options.get("region_name"),
        )
        config = Config(
            connect_timeout=options.get("connect_timeout", 10),
            read_timeout=options.get("read_timeout", 60),
            retries={"max_attempts": options.get("max_attempts", 3), "mode": "standard"},
            max_pool_connections=max(10, options.get("max_concurrency", 8) + 2),
        )
        self._client = self._guard(
            "open", lambda: session.client("s3", endpoint_url=options.get("endpoint_url"), config=config)
        )
        for operation in ("PutObject", "CompleteMultipartUpload"):  # s3transfer's uploads included
            self._client.meta.events.register(f"before-parameter-build.s3.{operation}", _create_only)
        self.lease_ttl_s = _seconds(options, "lease_ttl_s", 300.0, zero=False)
        self.lease_wait_s = _seconds(options, "lease_wait_s", self.lease_ttl_s, zero=True)
        chunk = options.get("chunk_bytes", 16 << 20)
        self._transfer = TransferConfig(
            multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=options.get("max_concurrency", 8)
        )

    # ---- errors ----------------------------------------------------------------------------------

    def _guard(self, what: str, call: Callable[[], Any], key: str | None = None) -> Any:
        """Run a client call; translate botocore's exceptions into typed errors naming the object."""
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        where = f"{SCHEME}{self.url.bucket}/{key}" if key is not None else str(self.url)
        try:
            return call()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                raise PreconditionFailed(where) from exc
            if code in ("NoSuchKey", "404") and key is not None:
                raise FileNotFoundError(where) from exc
            if code in ("NoSuchBucket", "404"):  # HEAD replies carry no body, so no code: 404 is the bucket
                raise BucketNotFoundError(f"{what}: the bucket {self.url.bucket!r} does not exist", path=where) from exc
            if code in _AUTH_CODES or status == 403:
                why = f"{code}: {error.get('Message', '')}"
                raise RemoteAuthError(
                    f"{what}: the credentials were refused on bucket {self.url.bucket!r} ({why})", path=where
                ) from exc
            raise RemoteError(f"{what}: {code or status} {error.get('Message', '')}".rstrip(), path=where) from exc
        except NoCredentialsError as exc:
            raise RemoteAuthError(f"{what}: no credentials found for bucket {self.url.bucket!r}", path=where) from exc
        except (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError) as exc:
            raise EndpointUnreachableError(f"{what}: the endpoint cannot be reached ({exc})", path=where) from exc
        except (RemoteError, PreconditionFailed, FileNotFoundError):
            raise
        except KeyError as exc:  # a reply without a field every reply of its kind has: cut short by a dying endpoint
            raise EndpointUnreachableError(
                f"{what}: the endpoint's reply was cut short (it lacked {exc}): the endpoint went away or cannot be "
                "reached",
                path=where,
            ) from exc
        except Exception as exc:  # botocore/urllib3 raise many more kinds; none may escape untyped
            raise RemoteError(f"{what}: {type(exc).__name__}: {exc}", path=where) from exc

    def where(self, relpath: str) -> str:
        return f"{SCHEME}{self.url.bucket}/{self.url.key(relpath)}"

    # ---- requests ----------------------------------------------------------------------------------

    def check_access(self) -> None:
        """Fail now, typed, if the bucket is missing, the credentials are refused or the endpoint is down."""
        self._guard("checking the bucket", lambda: self._client.head_bucket(Bucket=self.url.bucket))
        probe = self.url.key(".ckptguard-access-probe")
        self._guard("listing the bucket", lambda: self._client.list_objects_v2(Bucket=self.url.bucket, Prefix=probe))

    def put_bytes(self, relpath: str, data: bytes, *, if_match: str | None = None) -> str:
        """Create an object whole, or replace the version whose ETag is `if_match`; returns the new ETag.

        Raises PreconditionFailed when the object exists (no `if_match`) or is another version than `if_match`.
        """
        key = self.url.key(relpath)
        conditions = {"IfMatch": if_match} if if_match else {}
        reply = self._guard(
            "writing", lambda: self._client.put_object(Bucket=self.url.bucket, Key=key, Body=data, **conditions), key
        )
        return str(reply["ETag"])

    def get_bytes(self, relpath: str, limit: int) -> tuple[bytes, str]:
        """(content, ETag) of a small object, reading at most `limit` + 1 bytes; FileNotFoundError if absent."""
        key = self.url.key(relpath)

        def get() -> tuple[bytes, str]:
            reply = self._client.get_object(Bucket=self.url.bucket, Key=key)
            with reply["Body"] as body:
                return body.read(limit + 1), str(reply["ETag"])

        return self._guard("reading", get, key)

    def upload_file(self, relpath: str, path: Path) -> tuple[int, str]:
        """Upload a local file (multipart when large); returns (size, xxh3-128) of the bytes sent."""
        with open(path, "rb") as fh:
            return self._upload(relpath, fh)

    def upload_chunks(self, relpath: str, chunks: Iterable[bytes | memoryview]) -> tuple[int, str]:
        """Upload bytes produced in memory (no local file); returns (size, xxh3-128) of the bytes sent."""
        return self._upload(relpath, _ChunkReader(chunks))  # type: ignore[arg-type]

    def _upload(self, relpath: str, source: BinaryIO) -> tuple[int, str]:
        key = self.url.key(relpath)
        reader = _HashingReader(source)

        def send() -> None:
            from boto3.exceptions import S3UploadFailedError
            from botocore.exceptions import ClientError

            try:
                self._client.upload_fileobj(reader, self.url.bucket, key, Config=self._transfer)
            except S3UploadFailedError as exc:  # boto3's wrapper hides the reply's code (412: the key exists)
                if isinstance(exc.__context__, ClientError):
                    raise exc.__context__ from None
                raise

        self._guard("uploading", send, key)
        return reader.size, reader.hasher.hexdigest()

    def download_file(self, relpath: str, fh: BinaryIO) -> tuple[int, str]:
        """Stream an object into `fh`; returns (size, xxh3-128) of the bytes received.

        One ranged-free GET streamed in order: on servers that copy the whole object per ranged GET
        (moto) parallel ranges were 3-14x slower, and in-order bytes let the hash run as they arrive.
        """
        key = self.url.key(relpath)
        sink = _HashingWriter(fh)

        def get() -> None:
            reply = self._client.get_object(Bucket=self.url.bucket, Key=key)
            with reply["Body"] as body:
                while chunk := body.read(self._transfer.multipart_chunksize):
                    sink.write(chunk)

        self._guard("downloading", get, key)
        return sink.size, sink.hasher.hexdigest()

    def list(self, relprefix: str = "") -> dict[str, int]:
        """Every object under the run's prefix (+ `relprefix`): path relative to the run -> size."""
        return {relpath: size for relpath, (size, _) in self.listing(relprefix).items()}

    def listing(self, relprefix: str = "") -> dict[str, tuple[int, str]]:
        """Every object under the run's prefix (+ `relprefix`): path relative to the run -> (size, ETag)."""
        base = self.url.key("")
        prefix = self.url.key(relprefix)

        def walk() -> Iterator[tuple[str, tuple[int, str]]]:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.url.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(base) :], (int(obj["Size"]), str(obj["ETag"]))

        return self._guard("listing", lambda: dict(walk()))

    def delete(self, relpaths: list[str], etags: Mapping[str, str] | None = None) -> None:
        """Delete objects, in the order given, one request per 1000 (absent ones are not an error).

        With `etags` (relpath -> ETag, from :meth:`listing`) each delete is conditional: an object that
        changed since it was listed stays, and PreconditionFailed says so after the rest of its batch.
        """
        for start in range(0, len(relpaths), 1000):
            batch = [
                {"Key": self.url.key(p)} | ({"ETag": etags[p]} if etags is not None else {})
                for p in relpaths[start : start + 1000]
            ]
            reply = self._guard(
                "deleting",
                lambda b=batch: self._client.delete_objects(Bucket=self.url.bucket, Delete={"Objects": b}),
            )
            errors = [e for e in reply.get("Errors", []) if e.get("Code") != "NoSuchKey"]  # gone already: deleted
            if any(e.get("Code") in ("PreconditionFailed", "ETag") for e in errors):
                raise PreconditionFailed(f"{SCHEME}{self.url.bucket}/{errors[0].get('Key')}")
            if errors:
                first = errors[0]
                raise RemoteError(f"deleting: {first.get('Code')} {first.get('Message', '')}", path=first.get("Key"))


def _create_only(params: dict[str, Any], **_: Any) -> None:
    """botocore hook on every write: create-only (``If-None-Match: *``) unless it is a compare-and-swap."""
    if "IfMatch" not in params:
        params.setdefault("IfNoneMatch", "*")
