"""One writer per remote run: a lease object, created and renewed only by conditional writes.

Rules (there is no flock on a bucket, and a writer can vanish without a word):

* **Take**: create ``.ckptguard.lease`` create-only (``If-None-Match: *``). It records the holder
  (host, pid, a random token) and an expiry ``lease_ttl_s`` (a storage option, 300 s) ahead on the holder's clock.
* **Refuse**: a lease that exists and has not expired gives the second writer a LockedError naming
  the holder and the expiry.
* **Renew**: a background thread rewrites it every ``ttl_s / 3`` with ``If-Match`` on the ETag it
  last wrote. A renewal that fails its condition means another writer took the lease; one that finds
  the lease gone means someone removed it (a new holder may have come and gone since): either way
  the lease is lost for good, and every later upload or prune stops with a LockedError.
* **Fence**: a successful renewal proves the lease was ours at that instant and stays ours for
  ``ttl_s``, since no one may take it before it expires. So every step that deletes or commits
  (un-committing an old upload, the marker, a prune) is preceded by :meth:`Lease.renew`;
  a writer that paused past its TTL finds out there, before it touches anything. Writes are create-only
  and deletes conditional on the ETags just listed (objectstore), which covers a pause that falls
  between the renewal and the request it guards: nothing another writer wrote is replaced.
* **Stale**: a lease past its expiry belongs to a writer that died (or lost its network for longer
  than the TTL); a new writer takes it over with ``If-Match`` on the stale ETag, so of two writers
  racing for the same stale lease exactly one wins. Clocks are assumed to agree to well within ttl_s.
* **Release**: at close the lease is deleted if it is still ours.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from ckptguard.errors import LockedError, RemoteError
from ckptguard.layout import LEASE_NAME
from ckptguard.manifest import ManifestError, parse_json
from ckptguard.storage.objectstore import ObjectStore, PreconditionFailed

log = logging.getLogger("ckptguard")
_MAX_LEASE_BYTES = 4096


class Lease:
    """The lease on one remote run; :meth:`acquire` before any write, :meth:`release` at close."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.ttl_s = store.lease_ttl_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": time.time() + self.ttl_s, "ttl_s": self.ttl_s}).encode()

    def acquire(self) -> None:
        """Take the lease, or take over a stale one; LockedError if a live writer holds it."""
        try:
            self._etag = self.store.put_bytes(LEASE_NAME, self._body())
        except PreconditionFailed:
            self._take_over_stale()
        self._thread = threading.Thread(target=self._renew_loop, name="ckptguard-lease", daemon=True)
        self._thread.start()

    def _take_over_stale(self) -> None:
        try:
            data, etag = self.store.get_bytes(LEASE_NAME, _MAX_LEASE_BYTES)
        except FileNotFoundError:  # released between our create and our read: try once more
            self._etag = self._conditional(lambda: self.store.put_bytes(LEASE_NAME, self._body()))
            return
        holder, expires = _parse(data, self.store.where(LEASE_NAME))
        if time.time() <= expires:
            raise LockedError(
                f"another writer holds the lease ({holder}) until {time.strftime('%H:%M:%S', time.localtime(expires))}",
                path=self.store.where(LEASE_NAME),
                remedy="Stop the other run, or use another URL; a dead writer's lease can be taken once it expires.",
            )
        log.warning("taking over the stale lease of %s on %s", holder, self.store.url)
        self._etag = self._conditional(lambda: self.store.put_bytes(LEASE_NAME, self._body(), if_match=etag))

    def _conditional(self, write: Any) -> str:
        try:
            return str(write())
        except PreconditionFailed as exc:
            raise LockedError(
                "another writer took the lease at the same moment", path=self.store.where(LEASE_NAME)
            ) from exc

    def renew(self) -> None:
        """Extend the lease now; LockedError if it was lost (now, or by an earlier renewal)."""
        with self._guard:
            if self._lost is None:
                try:
                    self._etag = self.store.put_bytes(LEASE_NAME, self._body(), if_match=self._etag)
                    return
                except PreconditionFailed:
                    self._lost = "another writer took over the lease"
                except FileNotFoundError:  # never re-created: a new holder may have committed and released
                    self._lost = "the lease object was deleted while this writer held it"
            raise LockedError(
                f"this writer lost the lease: {self._lost}; nothing more is written or deleted",
                path=self.store.where(LEASE_NAME),
                remedy="Another writer (or a person) took this remote run over; check `ckptguard ls` on the URL "
                "and restart this run once the other writer is done.",
            )

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LockedError:
                return  # kept in _lost: the next upload raises it
            except Exception as exc:  # the endpoint is down, or worse: the next renewal or upload says so
                log.warning("could not renew the lease on %s: %s", self.store.url, exc)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (a taken-over lease is left alone)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._guard:
            if self._etag is None or self._lost is not None:
                return
            try:
                self.store.delete([LEASE_NAME], {LEASE_NAME: self._etag})
            except PreconditionFailed:
                pass  # another writer's now (taken over after a pause): theirs to release
            except RemoteError as exc:
                log.warning("could not release the lease on %s: %s", self.store.url, exc)
            self._etag = None


def holder(store: ObjectStore) -> tuple[str, float] | None:
    """(holder, expiry) of the run's lease, or None when no writer holds it (for ``ckptguard doctor``)."""
    try:
        data, _ = store.get_bytes(LEASE_NAME, _MAX_LEASE_BYTES)
    except FileNotFoundError:
        return None
    return _parse(data, store.where(LEASE_NAME))


def _parse(data: bytes, where: str) -> tuple[str, float]:
    """(holder, expiry) of a lease object; a damaged one is a LockedError: never guess it is stale."""
    try:
        body = parse_json(data[:_MAX_LEASE_BYTES], LEASE_NAME)
    except ManifestError:
        body = None
    expires = body.get("expires") if isinstance(body, dict) else None
    if not isinstance(expires, (int, float)) or isinstance(expires, bool):
        raise LockedError(
            "the lease object is damaged, so whether a writer holds it cannot be told",
            path=where,
            remedy="Make sure no writer uses this run, then delete the lease object.",
        )
    return str(body.get("holder"))[:200], float(expires)
