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
* **Dead on this host**: the lease records where its holder runs (host name, boot id, PID namespace)
  and which process it is (pid and start time). A new writer in the same place whose holder process
  is gone (killed, preempted, crashed) takes the lease over at once, as the kernel frees a dead
  process's flock; a live one is refused at once. A pid taken by a later process has another start
  time, so it never passes for the holder.
* **Elsewhere**: a holder on another host (or one whose lease predates these fields) cannot be told
  dead, so a new writer waits for the expiry, saying whose lease it waits for and how long, at most
  ``lease_wait_s`` (a storage option, default ``lease_ttl_s``), then takes it over as stale. A renewal
  seen while waiting proves the holder alive: refused then, without waiting out the rest.
* **Release**: at close, and at interpreter exit for a writer that never closed (after background saves and
  uploads have finished), the lease is deleted if it is still ours; never by a forked child.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ckptguard.errors import LockedError, RemoteError
from ckptguard.format.layout import LEASE_NAME
from ckptguard.format.manifest import ManifestError, parse_json
from ckptguard.s3.objectstore import ObjectStore, PreconditionFailed

log = logging.getLogger("ckptguard")
_MAX_LEASE_BYTES = 4096
_held: weakref.WeakSet[Lease] = weakref.WeakSet()


class Lease:
    """The lease on one remote run; :meth:`acquire` before any write, :meth:`release` at close."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.ttl_s = store.lease_ttl_s
        self.wait_s = store.lease_wait_s
        self.pid = os.getpid()
        self.holder = f"{socket.gethostname()}:{self.pid}:{secrets.token_hex(4)}"
        self._place, self._started = this_place(), process_start(self.pid)
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(
            {
                "holder": self.holder, "expires": time.time() + self.ttl_s, "ttl_s": self.ttl_s,
                "place": self._place, "pid": self.pid, "started": self._started,
            }
        ).encode()  # fmt: skip

    def acquire(self) -> None:
        """Take the lease, or take over one whose holder is gone; LockedError if a live writer holds it."""
        try:
            self._etag = self.store.put_bytes(LEASE_NAME, self._body())
        except PreconditionFailed:
            self._take_over()
        _held.add(self)
        self._thread = threading.Thread(target=self._renew_loop, name="ckptguard-lease", daemon=True)
        self._thread.start()

    def _take_over(self) -> None:
        """The lease exists: take it once its holder is known dead or its expiry has passed, else refuse."""
        where = self.store.where(LEASE_NAME)
        first: tuple[float, str] | None = None  # when the wait for the expiry began, and the ETag seen then
        while True:
            try:
                data, etag = self.store.get_bytes(LEASE_NAME, _MAX_LEASE_BYTES)
            except FileNotFoundError:  # released since: create it, as the first writer would
                self._etag = self._conditional(partial(self.store.put_bytes, LEASE_NAME, self._body()))
                return
            held = _parse(data, where)
            left, alive = held.expires - time.time(), held.alive_here()
            if left < 0 or alive is False:
                why = "stale lease" if left < 0 else "lease (that process has ended)"
                log.warning("taking over the %s of %s on %s", why, held.holder, self.store.url)
                self._etag = self._conditional(partial(self.store.put_bytes, LEASE_NAME, self._body(), if_match=etag))
                return
            renewed = first is not None and etag != first[1]
            waited = 0.0 if first is None else time.monotonic() - first[0]
            if alive or renewed or left > self.wait_s - waited:
                until = time.strftime("%H:%M:%S", time.localtime(held.expires))
                raise LockedError(
                    f"another writer holds the lease ({held.holder}) until {until}"
                    + _why_refused(alive, renewed, left, self.wait_s),
                    path=where,
                    remedy="Stop the other run, or use another URL; the lease of a writer that died on another host "
                    "expires lease_ttl_s after its last renewal (storage_options lease_wait_s: how long a new run "
                    "waits for that).",
                )
            if first is None:
                first = (time.monotonic(), etag)
                log.warning(
                    "the lease on %s is held by %s, which this host cannot see; waiting %.0f s for it to expire "
                    "(a live holder renews it, and then this run is refused)",
                    self.store.url, held.holder, left,
                )  # fmt: skip
            time.sleep(min(left + 0.05, max(self.ttl_s / 10, 0.05), 5.0))

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
        _held.discard(self)
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
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


def _release_all_at_exit() -> None:
    """A process that exits without closing its writer frees its leases, as the kernel frees its flocks.

    An ``atexit`` hook: it runs after the threading exit hooks, which finish the background save in
    flight (background.py) and the uploads queued behind it, so nothing is released under a running
    upload. A forked child holds its parent's leases only as copies: it never releases them.
    """
    for lease in list(_held):
        if lease.pid == os.getpid():
            lease.release()


atexit.register(_release_all_at_exit)


@dataclass(frozen=True)
class Held:
    """What a lease object says of its holder."""

    holder: str
    expires: float
    place: str | None = None
    pid: int | None = None
    started: str | None = None

    def alive_here(self) -> bool | None:
        """Whether the holding process runs: True or False where this process can see it, else None.

        Seen only from the same host, boot and PID namespace; there a pid that now names another process
        (another start time) is a dead holder.
        """
        if self.place is None or self.pid is None or self.place != this_place():
            return None
        started = process_start(self.pid)
        return started is not None and started == self.started


def holder(store: ObjectStore) -> tuple[str, float] | None:
    """(holder, expiry) of the run's lease, or None when no writer holds it (for ``ckptguard doctor``)."""
    try:
        data, _ = store.get_bytes(LEASE_NAME, _MAX_LEASE_BYTES)
    except FileNotFoundError:
        return None
    held = _parse(data, store.where(LEASE_NAME))
    return held.holder, held.expires


def this_place() -> str | None:
    """Host name, boot id and PID namespace of this process: where a pid means one process; None off Linux."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{namespace}"


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, /proc/PID/stat), None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] if len(fields) > 19 and fields[0] not in ("Z", "X") else None  # a zombie has ended


def _why_refused(alive: bool | None, renewed: bool, left: float, wait_s: float) -> str:
    if alive:
        return " (its process runs on this host)"
    if renewed:
        return " (it renewed the lease while this run waited for it to expire: the holder is alive)"
    return f" ({left:.0f} s from now, past storage_options lease_wait_s={wait_s:g})"


def _parse(data: bytes, where: str) -> Held:
    """What a lease object says; a damaged one is a LockedError: never guess it is stale."""
    try:
        body = parse_json(data[:_MAX_LEASE_BYTES], LEASE_NAME)
    except ManifestError:
        body = None
    expires = body.get("expires") if isinstance(body, dict) else None
    if not isinstance(expires, (int, float)) or isinstance(expires, bool) or not math.isfinite(expires):
        raise LockedError(
            "the lease object is damaged, so whether a writer holds it cannot be told",
            path=where,
            remedy="Make sure no writer uses this run, then delete the lease object.",
        )
    assert isinstance(body, dict)
    place, pid, started = body.get("place"), body.get("pid"), body.get("started")
    return Held(
        holder=str(body.get("holder"))[:200],
        expires=float(expires),
        place=place if isinstance(place, str) else None,
        pid=pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None,
        started=started if isinstance(started, str) else None,
    )
